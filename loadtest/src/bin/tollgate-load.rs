//! `tollgate-load`: an HTTP/1.1 load generator for one address, open or closed loop.
//!
//! A thin command line over [`tollgate_loadtest::load`]: it builds a
//! [`LoadConfig`], runs it, prints the table (stdout, or stderr when the JSON
//! report goes to stdout) and writes the optional JSON report and
//! HdrHistogram interval log. Exits non-zero only when the arguments are bad
//! or a file cannot be written; failed requests are reported, not fatal.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgGroup, Parser, ValueEnum};
use tollgate_loadtest::load::{run, LoadConfig, Mode, Payload};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PayloadArg {
    Openai,
    OpenaiStream,
    Anthropic,
    AnthropicStream,
}

/// Measures HTTP/1.1 latency against one address: thread per connection,
/// blocking sockets, open loop with coordinated-omission correction or closed loop.
#[derive(Debug, Parser)]
#[command(name = "tollgate-load", version)]
#[command(group(ArgGroup::new("pacing").required(true).args(["rate", "closed"])))]
struct Args {
    /// Address to load (IP:PORT).
    #[arg(long)]
    target: SocketAddr,
    /// Built-in request body.
    #[arg(
        long,
        value_enum,
        default_value = "openai",
        conflicts_with = "body_file"
    )]
    payload: PayloadArg,
    /// Send this file as the body instead.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// With --body-file: the response is an event stream.
    #[arg(long, requires = "body_file")]
    stream: bool,
    /// Request path (default by payload: /v1/chat/completions or /v1/messages).
    #[arg(long)]
    path: Option<String>,
    /// Request method.
    #[arg(long, default_value = "POST")]
    method: String,
    /// Extra header, `name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Connections (one thread each).
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    /// Open loop: requests per second, all connections together.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: each connection sends again as soon as its response completed.
    #[arg(long)]
    closed: bool,
    /// Measured duration (`500ms`, `10s`, `2m`).
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before measuring; its samples are discarded.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Stop after this many measured requests.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Spin for at most this many microseconds before an open-loop send (0..=100).
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
    /// Write an HdrHistogram interval log of TTLB (one interval per second) here.
    #[arg(long)]
    hdr_log: Option<PathBuf>,
    /// Print a progress line on stderr every second (default: when stderr is
    /// a terminal or the run is longer than 10 s).
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,
    /// Never print progress.
    #[arg(long, overrides_with = "progress")]
    no_progress: bool,
}

/// Parses `250us`, `500ms`, `10s`, `1.5s`, `2m`, `1h`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 500ms, 10s, 2m)"))?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use us, ms, s, m, h)"
            ))
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_header(h: &str) -> anyhow::Result<(String, String)> {
    let Some((name, value)) = h.split_once(':') else {
        bail!("header {h:?} is not `name: value`");
    };
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let payload = match &args.body_file {
        Some(path) => Payload::Custom {
            body: std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            stream: args.stream,
        },
        None => match args.payload {
            PayloadArg::Openai => Payload::OpenAi,
            PayloadArg::OpenaiStream => Payload::OpenAiStream,
            PayloadArg::Anthropic => Payload::Anthropic,
            PayloadArg::AnthropicStream => Payload::AnthropicStream,
        },
    };
    let mut cfg = LoadConfig::new(args.target, payload);
    if let Some(path) = args.path {
        cfg.path = path;
    }
    cfg.method = args.method;
    cfg.headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<anyhow::Result<_>>()?;
    cfg.connections = args.connections;
    cfg.mode = match (args.rate, args.closed) {
        (Some(rate), false) => Mode::Open { rate },
        (None, true) => Mode::Closed,
        _ => bail!("give exactly one of --rate and --closed"),
    };
    cfg.duration = args.duration;
    cfg.warmup = args.warmup;
    cfg.max_requests = args.max_requests;
    cfg.timeout = args.timeout;
    cfg.spin = Duration::from_micros(args.spin_us.min(100));
    cfg.progress = if args.no_progress {
        false
    } else {
        args.progress
            || std::io::stderr().is_terminal()
            || args.warmup + args.duration > Duration::from_secs(10)
    };
    cfg.intervals = args.hdr_log.is_some();

    let report = run(&cfg).context("running the load")?;

    let table = report.table();
    if args.json.as_deref() == Some("-") {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    if let Some(dest) = &args.json {
        let text =
            serde_json::to_string_pretty(&report.to_json()).context("encoding the JSON report")?;
        if dest == "-" {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").context("writing the JSON report")?;
        } else {
            std::fs::write(dest, format!("{text}\n")).with_context(|| format!("writing {dest}"))?;
        }
    }
    if let Some(path) = &args.hdr_log {
        let mut buf = Vec::new();
        report.write_interval_log(&mut buf)?;
        std::fs::write(path, buf).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("x-api-key: a:b").unwrap(),
            ("x-api-key".to_owned(), "a:b".to_owned())
        );
        assert!(parse_header("nocolon").is_err());
    }
}
