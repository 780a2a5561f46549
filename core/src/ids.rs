//! Identifiers and the policy version.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id!(
    /// One sampled completion; unique within a run.
    TrajectoryId
);
id!(
    /// The G samples drawn for one prompt; the unit of advantage computation.
    GroupId
);
id!(
    /// A prompt handed out by the prompt source; its position in the data order.
    PromptId
);
id!(
    /// How many optimizer steps the weights that sampled a trajectory had taken.
    /// The learner bounds `current - sampled` by `learner.max_staleness`.
    PolicyVersion
);

impl PolicyVersion {
    /// How many versions `self` is behind `current` (0 when not behind).
    pub fn lag_behind(self, current: PolicyVersion) -> u64 {
        current.0.saturating_sub(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_saturating() {
        assert_eq!(PolicyVersion(3).lag_behind(PolicyVersion(5)), 2);
        assert_eq!(PolicyVersion(5).lag_behind(PolicyVersion(3)), 0);
    }
}
