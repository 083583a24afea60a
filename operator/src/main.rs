//! The `postern-operator` command: `run` runs the controller, `crd` prints
//! the CustomResourceDefinition.

use clap::{Parser, Subcommand};

/// Kubernetes operator for Postern relay clusters (MailQueue resources).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the MailQueue CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", postern_operator::crd::crd_yaml());
            Ok(())
        }
    }
}
