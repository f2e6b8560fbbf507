//! JSON logs with span fields (above all `op_id`) lifted to the top level of
//! each record, so `jq 'select(.op_id=="op-…")'` finds every line of a call in
//! every process's log.

use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::{format::Writer, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Environment variable that overrides the configured level.
pub const LEVEL_ENV: &str = "BANGER_LOG_LEVEL";

/// Installs the global subscriber. `file` appends to a log file, otherwise
/// records go to stderr. The level is `BANGER_LOG_LEVEL`, else `level`, else
/// `info`.
pub fn init(component: &'static str, level: Option<&str>, file: Option<&Path>) -> std::io::Result<()> {
    let level = std::env::var(LEVEL_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| level.map(str::to_owned))
        .unwrap_or_else(|| "info".into());
    // netlink-packet-route warns on every kernel attribute newer than itself.
    let level = format!("{level},netlink_packet_route=error,netlink_proto=error");
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().event_format(JsonLine { component });
    let registry = tracing_subscriber::registry().with(filter).with(SpanFieldsLayer);
    match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            let _ = registry.with(fmt.with_writer(Mutex::new(f))).try_init();
        }
        None => {
            let _ = registry.with(fmt.with_writer(std::io::stderr)).try_init();
        }
    }
    Ok(())
}

/// Span fields, captured once when the span is created.
struct SpanFields(Map<String, Value>);

struct SpanFieldsLayer;

impl<S> Layer<S> for SpanFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut v = JsonVisitor::default();
        attrs.record(&mut v);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(v.0));
        }
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(fields) = ext.get_mut::<SpanFields>() {
                let mut v = JsonVisitor(std::mem::take(&mut fields.0));
                values.record(&mut v);
                fields.0 = v.0;
            }
        }
    }
}

#[derive(Default)]
struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0.insert(field.name().to_string(), Value::String(s));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_string(), Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), value.into());
    }
}

struct JsonLine {
    component: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut rec = Map::new();
        rec.insert("ts".into(), Value::String(now_rfc3339()));
        rec.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        rec.insert("component".into(), Value::String(self.component.into()));
        rec.insert("target".into(), Value::String(event.metadata().target().into()));
        // Outer spans first so inner ones win on a clash.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &fields.0 {
                        rec.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let mut v = JsonVisitor::default();
        event.record(&mut v);
        for (k, val) in v.0 {
            rec.insert(k, val);
        }
        let line = serde_json::to_string(&Value::Object(rec)).map_err(|_| std::fmt::Error)?;
        writeln!(w, "{line}")
    }
}

fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Flushes stderr; a convenience for binaries that exit right after logging.
pub fn flush() {
    let _ = std::io::stderr().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
    }
}
