//! `lmgen`: generate, score and embed with Hugging Face causal LMs (reference: docs/cli.md).
mod alloc;
mod args;
mod bench;
mod commands;
mod jobs;
mod openai;
mod plan;
mod progress;
mod sbatch;
mod signals;
mod util;
mod version;

use args::{Cli, Command};
use clap::error::ErrorKind;
use clap::Parser;

#[global_allocator]
static GLOBAL: alloc::HugePageAlloc = alloc::HugePageAlloc;

fn die(code: i32, msg: &str) -> ! {
    eprintln!("lmgen: error: {}", util::one_line(msg));
    std::process::exit(code)
}

/// A clap error as one line: its text up to the first blank line (usage/help hints dropped).
fn clap_one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let head: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).collect();
    let msg = util::one_line(&head.join(" "));
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_string();
    format!("{msg} (see lmgen --help)")
}

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() == 2 && (argv[1] == "--version" || argv[1] == "-V") {
        print!("{}", version::long_version());
        std::process::exit(0)
    }
    let argv = args::rewrite_short_form(argv).unwrap_or_else(|m| die(2, &m));
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                std::process::exit(0)
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                std::process::exit(2)
            }
            _ => die(2, &clap_one_line(&e)),
        },
    };
    let threads = match &cli.command {
        Command::Generate(a) => a.model.threads,
        Command::Score(a) => a.model.threads,
        Command::Embed(a) => a.model.threads,
        Command::Bench(a) => a.threads,
        Command::Plan(_) | Command::Merge(_) | Command::Status(_) => None,
        Command::Sbatch(_) => None,
    };
    util::configure_threads(threads.map(|n| n as usize));
    let stop = signals::install();
    let result = match cli.command {
        Command::Generate(a) => commands::generate(a, &stop),
        Command::Score(a) => commands::score(a, &stop),
        Command::Embed(a) => commands::embed(a, &stop),
        Command::Merge(a) => jobs::merge(a),
        Command::Status(a) => jobs::status(a),
        Command::Bench(a) => bench::bench(a),
        Command::Plan(a) => plan::plan(a),
        Command::Sbatch(a) => sbatch::sbatch(a),
    };
    if let Err(e) = result {
        die(util::exit_code(&e), &format!("{e:#}"));
    }
}
