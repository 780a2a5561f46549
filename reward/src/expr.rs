//! A small arithmetic expression parser and evaluator, so that calculator
//! annotations in model text are checked without ever running model text.
//!
//! Grammar (usual precedence, `^` binds tightest and is right-associative):
//! `expr := term (('+'|'-') term)*`, `term := unary (('*'|'/') unary)*`,
//! `unary := ('+'|'-') unary | power`, `power := atom ('^' unary)?`,
//! `atom := number | '(' expr ')'`. Numbers are decimal (`12`, `1.5`, `.5`);
//! spaces are ignored. Evaluation is in `f64`.

use std::fmt;

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ExprError {
    /// Byte offset in the expression where the problem was found.
    pub at: usize,
    pub reason: &'static str,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.at)
    }
}

/// Longest expression accepted, in bytes, and deepest nesting: model text is
/// untrusted, and recursion depth must stay bounded.
const MAX_LEN: usize = 4096;
const MAX_DEPTH: usize = 64;

/// Evaluates `text` as an arithmetic expression.
pub fn eval(text: &str) -> Result<f64, ExprError> {
    if text.len() > MAX_LEN {
        return Err(ExprError { at: MAX_LEN, reason: "expression too long" });
    }
    let mut p = Parser { s: text.as_bytes(), i: 0, depth: 0 };
    let v = p.expr()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(ExprError { at: p.i, reason: "unexpected character" });
    }
    if !v.is_finite() {
        return Err(ExprError { at: 0, reason: "result is not finite" });
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expr(&mut self) -> Result<f64, ExprError> {
        let mut v = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.term()?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Ok(v)
    }

    fn term(&mut self) -> Result<f64, ExprError> {
        let mut v = self.unary()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            let at = self.i;
            let r = self.unary()?;
            v = if op == b'*' {
                v * r
            } else if r == 0.0 {
                return Err(ExprError { at, reason: "division by zero" });
            } else {
                v / r
            };
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<f64, ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError { at: self.i, reason: "nested too deeply" });
        }
        let v = match self.peek() {
            Some(b'-') => {
                self.i += 1;
                -self.unary()?
            }
            Some(b'+') => {
                self.i += 1;
                self.unary()?
            }
            _ => self.power()?,
        };
        self.depth -= 1;
        Ok(v)
    }

    fn power(&mut self) -> Result<f64, ExprError> {
        let base = self.atom()?;
        if self.peek() == Some(b'^') {
            self.i += 1;
            let exp = self.unary()?;
            return Ok(base.powf(exp));
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<f64, ExprError> {
        match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let v = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(ExprError { at: self.i, reason: "expected `)`" });
                }
                self.i += 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                let start = self.i;
                while self.i < self.s.len() && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'.') {
                    self.i += 1;
                }
                let lit = std::str::from_utf8(&self.s[start..self.i])
                    .map_err(|_| ExprError { at: start, reason: "bad number" })?;
                lit.parse::<f64>().map_err(|_| ExprError { at: start, reason: "bad number" })
            }
            Some(_) => Err(ExprError { at: self.i, reason: "expected a number or `(`" }),
            None => Err(ExprError { at: self.i, reason: "unexpected end" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_associativity() {
        // Hand-evaluated.
        assert_eq!(eval("7+3*4-2").unwrap(), 17.0);
        assert_eq!(eval("(7+3)*4").unwrap(), 40.0);
        assert_eq!(eval("10-4-3").unwrap(), 3.0);
        assert_eq!(eval("48/4/2").unwrap(), 6.0);
        assert_eq!(eval("2^3^2").unwrap(), 512.0);
        assert_eq!(eval("-2^2").unwrap(), -4.0);
        assert_eq!(eval(" 80000 * 1.5 ").unwrap(), 120000.0);
        assert_eq!(eval("-(3-8)").unwrap(), 5.0);
        assert_eq!(eval(".5*4").unwrap(), 2.0);
        assert!((eval("10/3").unwrap() - 3.333333).abs() < 1e-5);
    }

    #[test]
    fn rejects_what_is_not_arithmetic() {
        assert_eq!(eval("2+").unwrap_err().reason, "unexpected end");
        assert_eq!(eval("2+x").unwrap_err(), ExprError { at: 2, reason: "expected a number or `(`" });
        assert_eq!(eval("(2+3").unwrap_err().reason, "expected `)`");
        assert_eq!(eval("1/0").unwrap_err().reason, "division by zero");
        assert_eq!(eval("1.2.3").unwrap_err().reason, "bad number");
        assert_eq!(eval("2 3").unwrap_err().reason, "unexpected character");
        assert_eq!(eval("__import__('os')").unwrap_err().at, 0);
        assert_eq!(eval(&"(".repeat(200)).unwrap_err().reason, "nested too deeply");
        assert_eq!(eval("9^999").unwrap_err().reason, "result is not finite");
    }
}
