//! `postern top`: a live view of a relay (or, with `--cluster`, of every
//! relay) from the admin API's statistics, redrawn every interval: rates in
//! and out with sparklines of the last minute, deferrals, bounces and
//! refusals, and per destination the queue depth (with its sparkline) and
//! the oldest message's age. `q` or Ctrl-C quits. Not on a terminal, or
//! with `--once`, it prints one frame (rates need two samples: one
//! interval apart) and exits.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::{short_duration, CliError};
use crate::admin::proto;
use crate::admin::proto::queue_client::QueueClient;

/// Samples kept for the sparklines.
const HISTORY: usize = 60;
/// Destinations shown, deepest first.
const DESTINATIONS: usize = 15;
/// Eight heights of a sparkline's bars.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// One statistics answer and when it came.
struct Sample {
    at: Instant,
    stats: proto::StatsResponse,
}

/// What the view remembers between frames.
#[derive(Default)]
struct History {
    samples: VecDeque<Sample>,
    /// Per second, per interval: in, out, deferred.
    rates: [VecDeque<f64>; 3],
    /// Queue depth per destination.
    depth: BTreeMap<String, VecDeque<f64>>,
}

fn counters(stats: &proto::StatsResponse) -> proto::Counters {
    stats.counters.unwrap_or_default()
}

fn push(series: &mut VecDeque<f64>, value: f64) {
    series.push_back(value);
    while series.len() > HISTORY {
        series.pop_front();
    }
}

/// `values` as bars scaled to their largest (all lowest when all zero).
pub fn sparkline(values: &VecDeque<f64>) -> String {
    let top = values.iter().cloned().fold(0.0_f64, f64::max);
    values
        .iter()
        .map(|v| {
            if top <= 0.0 {
                BARS[0]
            } else {
                BARS[((v / top) * (BARS.len() - 1) as f64).round() as usize]
            }
        })
        .collect()
}

impl History {
    fn add(&mut self, sample: Sample) {
        if let Some(last) = self.samples.back() {
            let seconds = sample.at.duration_since(last.at).as_secs_f64().max(0.001);
            let (old, new) = (counters(&last.stats), counters(&sample.stats));
            let per_second = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
            push(&mut self.rates[0], per_second(old.accepted, new.accepted));
            push(&mut self.rates[1], per_second(old.delivered, new.delivered));
            push(&mut self.rates[2], per_second(old.deferred, new.deferred));
        }
        let present: Vec<&str> = sample
            .stats
            .destinations
            .iter()
            .map(|d| d.destination.as_str())
            .collect();
        self.depth
            .retain(|name, _| present.contains(&name.as_str()));
        for destination in &sample.stats.destinations {
            push(
                self.depth
                    .entry(destination.destination.clone())
                    .or_default(),
                destination.messages as f64,
            );
        }
        self.samples.push_back(sample);
        while self.samples.len() > HISTORY {
            self.samples.pop_front();
        }
    }

    /// The frame: plain lines, at most `width` columns.
    fn render(&self, target: &str, width: usize) -> String {
        let Some(latest) = self.samples.back() else {
            return String::new();
        };
        let stats = &latest.stats;
        let now = chrono::Utc::now().format("%H:%M:%S");
        let mut out = String::new();
        let _ = writeln!(out, "postern top  {target}  {now}  (q quits)");
        let oldest = stats
            .oldest_arrival_ms
            .map(|t| short_duration(stats.now_ms.saturating_sub(t)))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "queue {}  active {}  deferred {}  held {}  oldest {oldest}",
            stats.total, stats.active, stats.deferred, stats.held
        );
        if !stats.relays.is_empty() {
            let _ = writeln!(out, "relays {}", stats.relays.join(", "));
        }
        for unreachable in &stats.unreachable {
            let _ = writeln!(out, "not answering: {unreachable}");
        }
        let totals = counters(stats);
        let _ = writeln!(
            out,
            "since start: accepted {}  delivered {}  deferred {}  bounced {}  refused {}",
            totals.accepted, totals.delivered, totals.deferred, totals.bounced, totals.refused
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<10}{:>8}{:>9}  last {}",
            "per second", "now", "avg", HISTORY
        );
        let spark_width = width.saturating_sub(32).clamp(10, HISTORY);
        for (name, series) in ["in", "out", "deferred"].iter().zip(&self.rates) {
            let now = series.back().copied().unwrap_or(0.0);
            let avg = if series.is_empty() {
                0.0
            } else {
                series.iter().sum::<f64>() / series.len() as f64
            };
            let tail: VecDeque<f64> = series
                .iter()
                .skip(series.len().saturating_sub(spark_width))
                .copied()
                .collect();
            let _ = writeln!(out, "{name:<10}{now:>8.1}{avg:>9.1}  {}", sparkline(&tail));
        }
        let _ = writeln!(out);
        let name_width = stats
            .destinations
            .iter()
            .map(|d| d.destination.chars().count())
            .max()
            .unwrap_or(11)
            .clamp(11, 40);
        let _ = writeln!(
            out,
            "{:<name_width$}  {:>8}  {:>10}  {:>7}  depth",
            "DESTINATION", "MESSAGES", "RECIPIENTS", "OLDEST"
        );
        let mut destinations: Vec<&proto::DestinationCount> = stats.destinations.iter().collect();
        destinations.sort_by(|a, b| {
            b.messages
                .cmp(&a.messages)
                .then_with(|| a.destination.cmp(&b.destination))
        });
        for destination in destinations.iter().take(DESTINATIONS) {
            let oldest = destination
                .oldest_arrival_ms
                .map(|t| short_duration(stats.now_ms.saturating_sub(t)))
                .unwrap_or_else(|| "-".into());
            let depth = self
                .depth
                .get(&destination.destination)
                .map(|series| {
                    let tail: VecDeque<f64> = series
                        .iter()
                        .skip(series.len().saturating_sub(spark_width.min(30)))
                        .copied()
                        .collect();
                    sparkline(&tail)
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<name_width$}  {:>8}  {:>10}  {:>7}  {depth}",
                super::truncate(&destination.destination, name_width),
                destination.messages,
                destination.recipients,
                oldest
            );
        }
        if destinations.len() > DESTINATIONS {
            let _ = writeln!(out, "… {} more", destinations.len() - DESTINATIONS);
        }
        out
    }
}

/// Puts the terminal back however the view ends.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        crossterm::terminal::enable_raw_mode()?;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(Screen)
    }

    fn draw(&self, frame: &str) -> std::io::Result<()> {
        let mut stdout = std::io::stdout();
        crossterm::queue!(
            stdout,
            crossterm::cursor::MoveTo(0, 0),
            crossterm::terminal::Clear(crossterm::terminal::ClearType::All)
        )?;
        // Raw mode: each line needs its carriage return.
        stdout.write_all(frame.replace('\n', "\r\n").as_bytes())?;
        stdout.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Whether `q`, Esc or Ctrl-C was pressed within `wait`.
async fn quit_pressed(wait: Duration) -> bool {
    tokio::task::spawn_blocking(move || {
        use crossterm::event::{self, Event, KeyCode, KeyModifiers};
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !event::poll(left).unwrap_or(false) {
                return false;
            }
            if let Ok(Event::Key(key)) = event::read() {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                    return true;
                }
            }
        }
    })
    .await
    .unwrap_or(true)
}

async fn sample(client: &mut QueueClient<Channel>, cluster: bool) -> Result<Sample, CliError> {
    let stats = client
        .stats(proto::StatsRequest { cluster })
        .await?
        .into_inner();
    Ok(Sample {
        at: Instant::now(),
        stats,
    })
}

/// Runs the view until `q`; returns what to print after it (nothing, or
/// the one frame when not live).
pub async fn run(
    client: &mut QueueClient<Channel>,
    target: &str,
    cluster: bool,
    interval: Duration,
    once: bool,
) -> Result<String, CliError> {
    let mut history = History::default();
    history.add(sample(client, cluster).await?);
    let live = !once && std::io::IsTerminal::is_terminal(&std::io::stdout());
    if !live {
        tokio::time::sleep(interval).await;
        history.add(sample(client, cluster).await?);
        return Ok(history.render(target, 100));
    }
    let screen = Screen::enter().map_err(|err| CliError::Usage(format!("terminal: {err}")))?;
    loop {
        let width = crossterm::terminal::size().map_or(100, |(w, _)| usize::from(w));
        screen
            .draw(&history.render(target, width))
            .map_err(|err| CliError::Usage(format!("terminal: {err}")))?;
        if quit_pressed(interval).await {
            return Ok(String::new());
        }
        history.add(sample(client, cluster).await?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(accepted: u64, delivered: u64, depth: u64) -> proto::StatsResponse {
        proto::StatsResponse {
            total: depth,
            deferred: depth,
            now_ms: 10_000_000,
            oldest_arrival_ms: Some(10_000_000 - 125_000),
            destinations: vec![proto::DestinationCount {
                destination: "mx:dest.test".into(),
                messages: depth,
                recipients: depth * 2,
                oldest_arrival_ms: Some(10_000_000 - 125_000),
            }],
            counters: Some(proto::Counters {
                accepted,
                delivered,
                ..proto::Counters::default()
            }),
            ..proto::StatsResponse::default()
        }
    }

    #[test]
    fn rates_come_from_counter_differences_and_depth_has_a_sparkline() {
        let start = Instant::now();
        let mut history = History::default();
        for (n, (accepted, delivered, depth)) in [(0, 0, 0), (10, 4, 6), (30, 10, 20)]
            .into_iter()
            .enumerate()
        {
            history.add(Sample {
                at: start + Duration::from_secs(2 * n as u64),
                stats: stats(accepted, delivered, depth),
            });
        }
        let frame = history.render("relay", 100);
        assert!(
            frame.contains("queue 20  active 0  deferred 20  held 0  oldest 2m"),
            "{frame}"
        );
        let line = |name: &str| {
            frame
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} line:\n{frame}"))
                .to_owned()
        };
        // In: 10 then 20 in 2 s each: 5/s then 10/s, 7.5 on average.
        assert_eq!(line("in "), "in            10.0      7.5  ▅█");
        assert_eq!(line("out "), "out            3.0      2.5  ▆█");
        assert!(
            line("mx:dest.test").ends_with("20          40       2m  ▁▃█"),
            "{frame}"
        );
        assert_eq!(sparkline(&VecDeque::from([0.0, 0.0])), "▁▁");
    }
}
