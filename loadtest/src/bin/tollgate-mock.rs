//! `tollgate-mock`: the mock LLM provider as a process.
//!
//! Prints one JSON line, `{"event":"listening","addr":"IP:PORT","tls":BOOL}`,
//! once bound, then serves until SIGINT or SIGTERM and exits 0.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tollgate_loadtest::{MockConfig, MockDefaults, TlsFiles};

/// A fast, deterministic mock of the OpenAI and Anthropic APIs.
#[derive(Debug, Parser)]
#[command(name = "tollgate-mock", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Output tokens per response (before max_tokens capping).
    #[arg(long, default_value_t = 16)]
    output_tokens: u64,
    /// Delay before each streamed token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Require this API key (OpenAI: Authorization: Bearer KEY; Anthropic: x-api-key: KEY).
    #[arg(long)]
    expect_key: Option<String>,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Do not record requests for GET /_mock/requests.
    #[arg(long)]
    no_record: bool,
}

/// The line printed once bound; fields in this order.
#[derive(serde::Serialize)]
struct Listening {
    event: &'static str,
    addr: String,
    tls: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert_pem), Some(key_pem)) => Some(TlsFiles { cert_pem, key_pem }),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let handle = tollgate_loadtest::spawn(MockConfig {
        listen: args.listen,
        threads: args.threads,
        tls,
        defaults: MockDefaults {
            output_tokens: args.output_tokens,
            token_delay: Duration::from_millis(args.token_delay_ms),
            expected_key: args.expect_key,
        },
    })
    .context("starting the mock")?;
    if args.no_record {
        handle.set_recording(false);
    }
    let line = serde_json::to_string(&Listening {
        event: "listening",
        addr: handle.addr().to_string(),
        tls: handle.is_tls(),
    })
    .context("encoding the listening line")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")?;
    drop(stdout);

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?
        .block_on(wait_for_signal())?;
    handle.shutdown();
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
