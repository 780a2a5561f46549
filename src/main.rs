//! prism: the command-line entry point. Parses arguments, resolves the
//! configuration, sets up tracing and hands over to one command.

mod bench;
mod cli;
mod config;
mod doctor;
mod eval;
mod export;
mod plan;
mod progress;
mod roles;
mod run_dir;
mod status;
mod serve;
mod telemetry;
mod train;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let (name, args) = cli.command.parts();
    let mut sets = args.sets.clone();
    // Command-line flags that stand for config keys are applied as the first --set.
    if let cli::Command::Serve(a) = &cli.command {
        let flags = [("model.source", &a.model), ("serve.addr", &a.addr)];
        let flags = flags.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", toml_string(v))));
        sets.splice(0..0, flags.collect::<Vec<_>>());
    }
    let mut file = args.config.clone();
    if let cli::Command::Train(t) | cli::Command::Learner(t) = &cli.command {
        // A resumed run keeps the configuration it recorded (not with
        // --resume-latest, whose command's configuration applies).
        if let (Some(run), None) = (&t.resume, &file) {
            file = Some(run.join("config.toml"));
        }
    }
    let layers = config::Layers::from_process(file, sets);
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
    // Training writes its own trace into the run folder.
    let resume = match &cli.command {
        cli::Command::Train(t) | cli::Command::Learner(t) if t.resume_latest => {
            match run_dir::latest_resumable(&config.run.dir, &config.dist.run_id) {
                Ok(Some(run)) => {
                    println!("resuming the latest run of dist.run_id {:?}: {}", config.dist.run_id, run.display());
                    Some(run)
                }
                Ok(None) => {
                    println!("no run of dist.run_id {:?} with a checkpoint under {}: starting a new one", config.dist.run_id, config.run.dir.display());
                    None
                }
                Err(e) => {
                    eprintln!("prism: run.dir {}: {e}", config.run.dir.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        cli::Command::Train(t) | cli::Command::Learner(t) => t.resume.clone(),
        _ => None,
    };
    match &cli.command {
        cli::Command::Train(_) => return exit_code(train::main(&config, resume.as_deref())),
        cli::Command::Learner(_) => {
            if let Err(e) = roles::check_exposure(&config) {
                eprintln!("prism: {e}");
                return ExitCode::from(config::EXIT_CONFIG as u8);
            }
            return exit_code(roles::learner(&config, resume.as_deref()));
        }
        _ => {}
    }
    let _console = telemetry::init_console(&config.log);
    match cli.command {
        cli::Command::Doctor(_) => doctor::run(&config),
        cli::Command::Rollout(_) => exit_code(roles::rollout(&config)),
        cli::Command::LearnerRank(_) => exit_code(roles::learner_rank(&config)),
        cli::Command::Reward(_) => exit_code(roles::reward(&config)),
        cli::Command::Status(a) => status::run(&config, a.learner.as_deref()),
        cli::Command::Plan(a) => exit_code(plan::run(&a, config.run.seed)),
        cli::Command::Serve(_) => {
            if let Err(e) = config.serve.check_exposure() {
                eprintln!("prism: {e}");
                return ExitCode::from(config::EXIT_CONFIG as u8);
            }
            exit_code(serve::main(&config.model, &config.serve, config.run.seed))
        }
        cli::Command::Export(a) => exit_code(export::main(&a.from, &a.to, &config.model, config.run.seed)),
        cli::Command::Eval(a) => match &a.what {
            Some(cli::EvalCommand::Processbench(args)) => eval::processbench(&config, args),
            None => exit_code(eval::checkpoint(&config, &a.checkpoint)),
        },
        cli::Command::Bench(b) => match &b.what {
            cli::BenchCommand::Generate(g) => exit_code(bench::generate(g, &config.model, config.run.seed)),
            cli::BenchCommand::Train(t) => exit_code(bench::train::train(t, &config.model, config.run.seed)),
            cli::BenchCommand::Reward(r) => bench::reward::reward(&config, r),
            cli::BenchCommand::Rollout(r) => exit_code(bench::rollout::rollout(&config, r)),
            cli::BenchCommand::JudgeServer(j) => bench::judge_server::judge_server(j),
        },
        cli::Command::Report(a) => match prism_report::run(&a.run, a.out.as_deref()) {
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
        cli::Command::Train(_) | cli::Command::Learner(_) => unreachable!("prism {name} returned above"),
    }
}

/// A command's outcome as an exit code: errors print their chain on one line.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prism: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `v` as a TOML string literal, so that `--set key=<v>` keeps it a string.
fn toml_string(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}
