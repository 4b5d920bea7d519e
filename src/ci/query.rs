//! Renders what the CI database holds for people and programs: aligned tables and detail
//! views, and JSON (field names after Cuirass's and Hydra's HTTP API: `jobset`, `job`,
//! `nixname`, `buildstatus`, `buildoutputs`...). Pure formatting: it neither opens the
//! database nor parses the command line.

use super::db::{Build, Evaluation, SpecRecord};
use crate::store::drv_json::JsonValue;

/// `YYYY-MM-DD HH:MM:SS` in UTC; `-` for 0 (not yet).
pub fn format_time(t: i64) -> String {
    if t == 0 {
        return "-".to_string();
    }
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Lays out rows under a header, columns separated by two spaces; the last column is
/// not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            l.push_str(c);
            if i < last {
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                l.extend(std::iter::repeat(' ').take(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn num(n: i64) -> JsonValue {
    JsonValue::Number(n.to_string())
}

fn obj(fields: Vec<(&str, JsonValue)>) -> JsonValue {
    JsonValue::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect(),
    )
}

fn opt_str(s: Option<&str>) -> JsonValue {
    s.map(JsonValue::str).unwrap_or(JsonValue::Null)
}

/// A JSON document as text with a final newline.
pub fn json_text(v: &JsonValue) -> String {
    String::from_utf8_lossy(&v.to_pretty()).into_owned()
}

// ---------------------------------------------------------------------------------------
// Specifications

pub fn specs_table(specs: &[SpecRecord]) -> String {
    let rows: Vec<Vec<String>> = specs
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.priority.to_string(),
                s.period.to_string(),
                if s.active { "yes" } else { "no" }.to_string(),
                format_time(s.loaded),
                s.systems.join(","),
            ]
        })
        .collect();
    table(
        &["NAME", "PRIORITY", "PERIOD", "ACTIVE", "LOADED", "SYSTEMS"],
        &rows,
    )
}

pub fn spec_json(s: &SpecRecord) -> JsonValue {
    obj(vec![
        ("name", JsonValue::str(&s.name)),
        ("priority", num(s.priority)),
        ("period", num(s.period.min(i64::MAX as u64) as i64)),
        (
            "systems",
            JsonValue::Array(s.systems.iter().map(|x| JsonValue::str(x)).collect()),
        ),
        ("active", JsonValue::Bool(s.active)),
        ("loaded", num(s.loaded)),
        ("text", JsonValue::str(&s.text)),
    ])
}

pub fn specs_json(specs: &[SpecRecord]) -> JsonValue {
    JsonValue::Array(specs.iter().map(spec_json).collect())
}

// ---------------------------------------------------------------------------------------
// Evaluations

fn short_commit(c: &str) -> &str {
    c.get(..12).unwrap_or(c)
}

pub fn evals_table(evals: &[Evaluation]) -> String {
    let rows: Vec<Vec<String>> = evals
        .iter()
        .map(|e| {
            let commits: Vec<String> = e
                .checkouts
                .iter()
                .map(|c| format!("{}@{}", c.input, short_commit(&c.commit)))
                .collect();
            vec![
                e.id.to_string(),
                e.spec.clone(),
                e.status.name().to_string(),
                format_time(e.start),
                format_time(e.stop),
                commits.join(","),
                e.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "SPEC", "STATUS", "STARTED", "STOPPED", "COMMITS", "REASON",
        ],
        &rows,
    )
}

pub fn eval_json(e: &Evaluation) -> JsonValue {
    obj(vec![
        ("id", num(e.id)),
        ("specification", JsonValue::str(&e.spec)),
        ("status", JsonValue::str(e.status.name())),
        ("statuscode", num(e.status.code())),
        ("reason", opt_str(e.reason.as_deref())),
        ("log", opt_str(e.log.as_deref())),
        ("starttime", num(e.start)),
        ("stoptime", num(e.stop)),
        ("commitset", JsonValue::str(&e.commits)),
        (
            "checkouts",
            JsonValue::Array(
                e.checkouts
                    .iter()
                    .map(|c| {
                        obj(vec![
                            ("input", JsonValue::str(&c.input)),
                            ("url", JsonValue::str(&c.url)),
                            ("commit", JsonValue::str(&c.commit)),
                            ("directory", JsonValue::str(&c.directory)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

pub fn evals_json(evals: &[Evaluation]) -> JsonValue {
    JsonValue::Array(evals.iter().map(eval_json).collect())
}

// ---------------------------------------------------------------------------------------
// Builds

pub fn builds_table(builds: &[Build]) -> String {
    let rows: Vec<Vec<String>> = builds
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.evaluation.to_string(),
                b.spec.clone(),
                b.job_name.clone(),
                b.system.clone(),
                b.status.name().to_string(),
                format_time(b.stop),
                b.derivation.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "EVAL",
            "SPEC",
            "JOB",
            "SYSTEM",
            "STATUS",
            "STOPPED",
            "DERIVATION",
        ],
        &rows,
    )
}

/// The detail view of one build: `key  value` lines.
pub fn build_detail(b: &Build) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("id".into(), b.id.to_string()),
        ("derivation".into(), b.derivation.clone()),
        ("job".into(), b.job_name.clone()),
        ("specification".into(), b.spec.clone()),
        ("evaluation".into(), b.evaluation.to_string()),
        ("system".into(), b.system.clone()),
        ("name".into(), b.nix_name.clone()),
        (
            "status".into(),
            format!("{} ({})", b.status.name(), b.status.code()),
        ),
        ("priority".into(), b.priority.to_string()),
        ("registered".into(), format_time(b.timestamp)),
        ("started".into(), format_time(b.start)),
        ("stopped".into(), format_time(b.stop)),
    ];
    if b.start > 0 && b.stop >= b.start {
        rows.push(("duration".into(), format!("{}s", b.stop - b.start)));
    }
    rows.push((
        "log".into(),
        if b.log.is_empty() {
            "-".into()
        } else {
            b.log.clone()
        },
    ));
    for (name, path) in &b.outputs {
        rows.push((format!("output {name}"), path.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:width$}  {v}\n"))
        .collect()
}

pub fn build_json(b: &Build) -> JsonValue {
    obj(vec![
        ("id", num(b.id)),
        ("derivation", JsonValue::str(&b.derivation)),
        ("evaluation", num(b.evaluation)),
        ("jobset", JsonValue::str(&b.spec)),
        ("job", JsonValue::str(&b.job_name)),
        ("system", JsonValue::str(&b.system)),
        ("nixname", JsonValue::str(&b.nix_name)),
        ("status", JsonValue::str(b.status.name())),
        ("buildstatus", num(b.status.code())),
        ("finished", JsonValue::Bool(b.status.is_terminal())),
        ("priority", num(b.priority)),
        ("timestamp", num(b.timestamp)),
        ("starttime", num(b.start)),
        ("stoptime", num(b.stop)),
        (
            "log",
            if b.log.is_empty() {
                JsonValue::Null
            } else {
                JsonValue::str(&b.log)
            },
        ),
        (
            "buildoutputs",
            JsonValue::Object(
                b.outputs
                    .iter()
                    .map(|(n, p)| {
                        (
                            n.as_bytes().to_vec(),
                            obj(vec![("path", JsonValue::str(p))]),
                        )
                    })
                    .collect(),
            ),
        ),
    ])
}

pub fn builds_json(builds: &[Build]) -> JsonValue {
    JsonValue::Array(builds.iter().map(build_json).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ci::db::BuildStatus;

    #[test]
    fn times() {
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(1), "1970-01-01 00:00:01");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "NAME", "X"],
            &[
                vec!["1".into(), "a".into(), "".into()],
                vec!["100".into(), "bbbbbb".into(), "z".into()],
            ],
        );
        assert_eq!(t, "ID   NAME    X\n1    a\n100  bbbbbb  z\n");
    }

    #[test]
    fn build_views() {
        let b = Build {
            id: 3,
            derivation: "/nix/store/x-hello.drv".into(),
            evaluation: 2,
            spec: "hello".into(),
            job_name: "hello".into(),
            system: "x86_64-linux".into(),
            nix_name: "hello-1.0".into(),
            log: String::new(),
            status: BuildStatus::Succeeded,
            priority: 9,
            timestamp: 1,
            start: 10,
            stop: 25,
            outputs: vec![("out".into(), "/nix/store/y-hello".into())],
        };
        let d = build_detail(&b);
        assert!(d.contains("status         succeeded (0)\n"), "{d}");
        assert!(d.contains("duration       15s\n"), "{d}");
        assert!(d.contains("output out     /nix/store/y-hello\n"), "{d}");
        let j = json_text(&build_json(&b));
        let v = JsonValue::parse(j.as_bytes()).unwrap();
        assert_eq!(v.get("buildstatus"), Some(&JsonValue::Number("0".into())));
        assert_eq!(v.get("log"), Some(&JsonValue::Null));
        assert_eq!(
            v.get("buildoutputs")
                .and_then(|o| o.get("out"))
                .and_then(|o| o.get("path"))
                .and_then(JsonValue::as_str),
            Some("/nix/store/y-hello")
        );
    }
}
