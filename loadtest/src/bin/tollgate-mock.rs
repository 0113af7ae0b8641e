//! `tollgate-mock`: the mock LLM provider as a process.
//!
//! Prints one JSON line, `{"event":"listening","addr":"IP:PORT","tls":BOOL}`,
//! once bound, then serves until SIGINT or SIGTERM and exits 0.

#![forbid(unsafe_code)]

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
    /// Real-API mode for every request: lenient JSON (last duplicate key wins),
    /// OpenAI `n` honoured, null caps uncapped, usage over all choices, and
    /// the bill in each request record (per request: x-mock-real-api: 1|0).
    #[arg(long)]
    real_api: bool,
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
    // Handlers first, so a signal sent right after the listening line is caught.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    let signals = runtime.block_on(async { Signals::install() })?;
    let handle = tollgate_loadtest::spawn(MockConfig {
        listen: args.listen,
        threads: args.threads,
        tls,
        defaults: MockDefaults {
            output_tokens: args.output_tokens,
            token_delay: Duration::from_millis(args.token_delay_ms),
            expected_key: args.expect_key,
            real_api: args.real_api,
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

    runtime.block_on(signals.wait());
    handle.shutdown();
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
