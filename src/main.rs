//! The `gatehouse` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gatehouse::config::Config;
use gatehouse::grpc::pb::ReloadRequest;
use gatehouse::grpc::pb::admin_client::AdminClient;

/// A policy sidecar for Envoy: OAuth2 tokens, rate limits, response shapes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve ext_authz, ext_proc and health for Envoy, and the admin API.
    Serve {
        /// The configuration file.
        #[arg(long, short, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
    },

    /// Validate a configuration file and exit.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },

    /// Ask a running Gatehouse to reload its configuration.
    Reload {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:50052")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                for warning in config.rendered_warnings() {
                    eprintln!("warning: {warning}");
                }
                println!("{}: ok (version {})", file.display(), config.version);
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => run(serve(config)),
        Command::Reload { admin } => run(reload(admin)),
    }
}

fn run(task: impl Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };

    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf) -> Result<(), String> {
    let config = Config::load(&path).map_err(|err| err.to_string())?;
    gatehouse::telemetry::init(config.server.log_format);

    gatehouse::server::serve(config).await.map_err(|err| {
        tracing::error!(error = %err, "gatehouse failed");
        err.to_string()
    })
}

async fn reload(admin: SocketAddr) -> Result<(), String> {
    let mut client = AdminClient::connect(format!("http://{admin}"))
        .await
        .map_err(|err| format!("cannot reach the admin API at {admin}: {err}"))?;
    let response = client
        .reload(ReloadRequest {})
        .await
        .map_err(|status| status.message().to_owned())?;

    let response = response.into_inner();
    let version = response
        .current
        .map(|current| current.version)
        .unwrap_or_default();
    println!(
        "reloaded: version {version} (changed: {})",
        response.changed
    );
    Ok(())
}
