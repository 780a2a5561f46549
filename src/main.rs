//! prism: the command-line entry point. Parses arguments, resolves the
//! configuration, sets up tracing and hands over to one command.

mod bench;
mod cli;
mod config;
mod doctor;
mod eval;
#[allow(dead_code)] // drawn by `prism train`
mod progress;
mod report;
#[allow(dead_code)] // written by the training commands
mod run_dir;
mod telemetry;

use clap::Parser;
use std::process::ExitCode;

/// Exit code of a subcommand that does not exist yet.
const EXIT_NOT_IMPLEMENTED: u8 = 2;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let (name, args) = cli.command.parts();
    let layers = config::Layers::from_process(args.config.clone(), args.sets.clone());
    let config = match config::load(&layers) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("prism: {e}");
            return ExitCode::from(config::EXIT_CONFIG as u8);
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let _console = telemetry::init_console(&config.log);
    match cli.command {
        cli::Command::Doctor(_) => doctor::run(&config),
        cli::Command::Eval(a) => match &a.what {
            cli::EvalCommand::Processbench(args) => eval::processbench(&config, args),
        },
        cli::Command::Bench(a) => match &a.what {
            cli::BenchCommand::Reward(args) => bench::reward(&config, args),
        },
        cli::Command::Report(a) => match report::run(&a.run, a.out.as_deref()) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("prism report: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("prism: `prism {name}` is not implemented yet");
            ExitCode::from(EXIT_NOT_IMPLEMENTED)
        }
    }
}
