//! `ch-remote`: drives a running VMM through its REST API socket.
//!
//! Each subcommand is one enum arm plus one arm in [`Command::request`]; the HTTP call,
//! output and error reporting are shared.
//!
//! Exit codes: 0 success, 1 the request failed (connection or HTTP error), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::VmSnapshotConfig;
use vmm::config::migration_params as migration;
use vmm::config::options::{self, OptionsError};
use vmm::errors::error_chain;

#[derive(Debug, Parser)]
#[command(
    name = "ch-remote",
    version,
    about = "Control a running cloud-hypervisor VMM"
)]
struct Cli {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the VMM answers; prints its version.
    Ping,
    /// Print the VM's configuration and state.
    Info,
    /// Pause the VM's vCPUs.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Shut the VM down (the VMM keeps running).
    Shutdown,
    /// Shut the VMM down.
    ShutdownVmm,
    /// Write a snapshot of the paused VM: `snapshot file:///dir`.
    Snapshot {
        /// file:///dir (the directory must not exist or be empty).
        destination_url: String,
    },
    /// Restore a snapshot into a VMM without a VM:
    /// `restore source_url=file:///dir[,memory_restore_mode=copy|ondemand][,resume=on]`.
    Restore {
        /// The restore options.
        options: String,
    },
    /// Send the VM to a VMM waiting in receive-migration:
    /// `send-migration destination_url=tcp:H:P|unix:PATH[,local=on][,connections=N]
    /// [,downtime_ms=N][,timeout_s=N][,timeout_strategy=cancel|ignore][,preserve_source=on]
    /// [,postcopy=on][,io_timeout_s=N]`.
    /// Returns once the migration has started; the source VMM exits when it is done.
    SendMigration {
        /// The migration options.
        options: String,
    },
    /// End the running send-migration. Before the destination was told to run the VM,
    /// the source VM resumes (if it ran); after, it stays paused for you to decide.
    CancelMigration,
    /// Wait for a migrating VM: `receive-migration receiver_url=unix:PATH|tcp:H:P
    /// [,postcopy=on][,page_timeout_s=N]`. Returns when the VM has arrived.
    ReceiveMigration {
        /// The receive options.
        options: String,
    },
}

/// One REST call.
struct ApiCall {
    method: &'static str,
    endpoint: &'static str,
    body: Option<String>,
}

impl ApiCall {
    fn get(endpoint: &'static str) -> Self {
        ApiCall {
            method: "GET",
            endpoint,
            body: None,
        }
    }

    fn put(endpoint: &'static str) -> Self {
        ApiCall {
            method: "PUT",
            endpoint,
            body: None,
        }
    }

    fn put_json<T: serde::Serialize>(
        endpoint: &'static str,
        body: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(ApiCall {
            body: Some(serde_json::to_string(body)?),
            ..ApiCall::put(endpoint)
        })
    }
}

/// An option string or body that cannot be sent (exit code 2).
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("cannot encode the request body")]
    Encode(#[from] serde_json::Error),
}

impl Command {
    fn request(&self) -> Result<ApiCall, UsageError> {
        Ok(match self {
            Command::Ping => ApiCall::get("vmm.ping"),
            Command::Info => ApiCall::get("vm.info"),
            Command::Pause => ApiCall::put("vm.pause"),
            Command::Resume => ApiCall::put("vm.resume"),
            Command::Shutdown => ApiCall::put("vm.shutdown"),
            Command::ShutdownVmm => ApiCall::put("vmm.shutdown"),
            Command::Snapshot { destination_url } => ApiCall::put_json(
                "vm.snapshot",
                &VmSnapshotConfig {
                    destination_url: destination_url.clone(),
                },
            )?,
            Command::Restore { options } => {
                ApiCall::put_json("vm.restore", &options::parse_restore(options)?)?
            }
            Command::SendMigration { options } => ApiCall::put_json(
                "vm.send-migration",
                &migration::parse_send_migration(options)?,
            )?,
            Command::CancelMigration => ApiCall::put("vm.cancel-migration"),
            Command::ReceiveMigration { options } => ApiCall::put_json(
                "vm.receive-migration",
                &migration::parse_receive_migration(options)?,
            )?,
        })
    }
}

/// A JSON body pretty-printed; anything else as it came.
fn pretty(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| body.trim_end().to_string())
}

/// An error answer for the terminal: the status and the outermost message, then each
/// cause on its own line.
fn error_report(response: &api_client::Response) -> String {
    let chain = response.error_chain();
    let mut out = match chain.first() {
        Some(first) => format!("error: HTTP {}: {first}\n", response.status),
        None => format!(
            "error: HTTP {}: {}\n",
            response.status,
            response.error_message()
        ),
    };
    for cause in chain.iter().skip(1) {
        out.push_str(&format!("  {cause}\n"));
    }
    out
}

fn main() -> ExitCode {
    // clap exits 2 on usage errors.
    let cli = Cli::parse();
    let call = match cli.command.request() {
        Ok(call) => call,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let response = match api_client::simple_api_command(
        &cli.api_socket,
        call.method,
        call.endpoint,
        call.body.as_deref(),
    ) {
        Ok(response) => response,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if !response.is_success() {
        eprint!("{}", error_report(&response));
        return ExitCode::FAILURE;
    }
    if !response.body.trim().is_empty() {
        println!("{}", pretty(&response.body));
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_map_to_endpoints() {
        let cases = [
            ("ping", "GET", "vmm.ping"),
            ("info", "GET", "vm.info"),
            ("pause", "PUT", "vm.pause"),
            ("resume", "PUT", "vm.resume"),
            ("shutdown", "PUT", "vm.shutdown"),
            ("shutdown-vmm", "PUT", "vmm.shutdown"),
            ("cancel-migration", "PUT", "vm.cancel-migration"),
        ];
        for (name, method, endpoint) in cases {
            let cli = Cli::try_parse_from(["ch-remote", "--api-socket", "/s", name]).unwrap();
            let call = cli.command.request().unwrap();
            assert_eq!((call.method, call.endpoint), (method, endpoint), "{name}");
            assert!(call.body.is_none());
        }
    }

    #[test]
    fn snapshot_and_restore_bodies() {
        let cli = Cli::try_parse_from(["ch-remote", "--api-socket", "/s", "snapshot", "file:///d"])
            .unwrap();
        let call = cli.command.request().unwrap();
        assert_eq!(call.endpoint, "vm.snapshot");
        assert_eq!(call.body.unwrap(), r#"{"destination_url":"file:///d"}"#);

        let cli = Cli::try_parse_from([
            "ch-remote",
            "--api-socket",
            "/s",
            "restore",
            "source_url=file:///d,memory_restore_mode=OnDemand,resume=on",
        ])
        .unwrap();
        let body: serde_json::Value =
            serde_json::from_str(&cli.command.request().unwrap().body.unwrap()).unwrap();
        assert_eq!(body["memory_restore_mode"], "OnDemand");
        assert_eq!(body["resume"], true);

        let cli =
            Cli::try_parse_from(["ch-remote", "--api-socket", "/s", "restore", "bogus=1"]).unwrap();
        assert!(cli.command.request().is_err());
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["ch-remote", "ping"][..],
            &["ch-remote", "--api-socket", "/s"],
            &["ch-remote", "--api-socket", "/s", "frobnicate"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn errors_print_the_chain_line_by_line() {
        let response = api_client::Response {
            status: 500,
            body: r#"["snapshot failed","cannot write /s/memory-0","No space left"]"#.into(),
        };
        assert_eq!(
            error_report(&response),
            "error: HTTP 500: snapshot failed\n  cannot write /s/memory-0\n  No space left\n"
        );
        let response = api_client::Response {
            status: 502,
            body: "<html>bad gateway</html>".into(),
        };
        assert_eq!(
            error_report(&response),
            "error: HTTP 502: <html>bad gateway</html>\n"
        );
    }

    /// The bodies Cloud Hypervisor's VMM reads: its names and capitalisation
    /// (`memory_mode`, `timeout_strategy`), never our `postcopy` alias.
    #[test]
    fn migration_bodies_speak_cloud_hypervisor() {
        let body = |args: &[&str]| -> serde_json::Value {
            let mut argv = vec!["ch-remote", "--api-socket", "/s"];
            argv.extend_from_slice(args);
            let call = Cli::try_parse_from(argv)
                .unwrap()
                .command
                .request()
                .unwrap();
            serde_json::from_str(&call.body.unwrap()).unwrap()
        };
        for opts in [
            "destination_url=tcp:127.0.0.1:6000,postcopy=on",
            "destination_url=tcp:127.0.0.1:6000,memory_mode=postcopy",
        ] {
            let b = body(&["send-migration", opts]);
            assert_eq!(b["memory_mode"], "Postcopy", "{opts}: {b}");
            assert!(b.get("postcopy").is_none(), "{opts}: {b}");
        }
        let b = body(&[
            "send-migration",
            "destination_url=tcp:127.0.0.1:6000,connections=4,timeout_strategy=ignore",
        ]);
        assert_eq!(
            (&b["timeout_strategy"], &b["memory_mode"], &b["connections"]),
            (&"Ignore".into(), &"Precopy".into(), &4.into()),
            "{b}"
        );
        let b = body(&["send-migration", "destination_url=unix:/m,local=on"]);
        assert_eq!(b["timeout_strategy"], "Cancel", "{b}");
        assert_eq!(b["downtime_ms"], 300, "{b}");
        assert_eq!(b["timeout_s"], 3600, "{b}");
        let b = body(&[
            "receive-migration",
            "receiver_url=tcp:0.0.0.0:6000,postcopy=on",
        ]);
        assert_eq!(b["memory_mode"], "Postcopy", "{b}");
        assert!(b.get("postcopy").is_none(), "{b}");
    }

    #[test]
    fn pretty_prints_json_only() {
        assert_eq!(pretty("{\"a\":1}"), "{\n  \"a\": 1\n}");
        assert_eq!(pretty("plain text\n"), "plain text");
    }
}
