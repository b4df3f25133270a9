//! The binary's logs, on stderr: `GRID_LOG` chooses what is logged, `GRID_LOG_FORMAT` how (`text`, the
//! default, or `json`: one object per line). Once the member's id is known, every line
//! carries it and the cluster's name (`member{id=… cluster=…}:` after the level, as a span
//! shows, or `"member"` and `"cluster"` keys), whichever task or span logged it.

use std::fmt;
use std::sync::OnceLock;

use anyhow::bail;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// (member id, cluster name) of the process's member.
static MEMBER: OnceLock<(String, String)> = OnceLock::new();

/// Puts the member's id and cluster on every line from now on (once per process).
pub(crate) fn set_member(id: &str, cluster: &str) {
    let _ = MEMBER.set((id.to_string(), cluster.to_string()));
}

/// Installs the subscriber: `format` is `GRID_LOG_FORMAT`'s value.
pub(crate) fn init(filter: EnvFilter, format: Option<&str>) -> anyhow::Result<()> {
    // Logs on stderr: stdout is for what the command prints (`grid status --json`, the
    // lines `grid node` prints for whoever runs it).
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false);
    match format.map(str::trim) {
        None | Some("") | Some("text") => builder
            .event_format(WithMember {
                inner: tracing_subscriber::fmt::format().with_target(false),
                json: false,
            })
            .init(),
        Some("json") => builder
            .event_format(WithMember {
                inner: tracing_subscriber::fmt::format().json().with_target(false),
                json: true,
            })
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .init(),
        Some(other) => bail!("GRID_LOG_FORMAT={other:?} is invalid (allowed: text or json)"),
    }
    Ok(())
}

/// A formatter that adds the member's id and cluster to each line `inner` writes.
struct WithMember<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithMember<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((member, cluster)) = MEMBER.get() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        if self.json {
            if let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(line) {
                object.insert("member".into(), member.clone().into());
                object.insert("cluster".into(), cluster.clone().into());
                return writeln!(writer, "{}", serde_json::Value::Object(object));
            }
            return writeln!(writer, "{line}");
        }
        // As a span would show: `… INFO member{id=a cluster=orders}: message fields` (the
        // event's own `member` field, when it has one, is the member it is about).
        let level = event.metadata().level().as_str();
        match line.find(level) {
            Some(at) => {
                let (head, rest) = line.split_at(at + level.len());
                writeln!(
                    writer,
                    "{head} member{{id={member} cluster={cluster}}}:{rest}"
                )
            }
            None => writeln!(writer, "{line} member{{id={member} cluster={cluster}}}"),
        }
    }
}
