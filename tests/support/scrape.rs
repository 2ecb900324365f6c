//! Reading Gatehouse's Prometheus endpoint as a scraper would: an HTTP GET
//! of `/metrics` and a small parser of the text exposition format.

use std::collections::BTreeMap;

/// One sample line: a series (name and labels) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric's name, with `_bucket`, `_sum` or `_count` for histograms.
    pub name: String,
    /// The labels, by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Everything one scrape returned.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The body, as served.
    pub text: String,
    /// Every sample, in the order served.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the series with exactly these labels; 0 when it is not
    /// served, as Prometheus treats a counter that has not appeared yet.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|sample| sample.name == name && sample.labels == wanted)
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} served twice:\n{}",
            self.text
        );
        found.first().map_or(0.0, |sample| sample.value)
    }

    /// How much a series grew since `before`.
    pub fn delta(&self, before: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels) - before.value(name, labels)
    }

    /// The `# TYPE` the body declares for `name`.
    pub fn kind(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|line| {
            let rest = line.strip_prefix("# TYPE ")?;
            let (metric, kind) = rest.split_once(' ')?;
            (metric == name).then_some(kind)
        })
    }
}

/// Scrapes `http://127.0.0.1:{port}/metrics`.
pub async fn scrape(port: u16) -> Scrape {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let response = reqwest::get(&url)
        .await
        .expect("the metrics endpoint answers");
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    let text = response.text().await.expect("the metrics body");

    let samples = text
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|| panic!("bad sample line {line:?}")))
        .collect();
    Scrape { text, samples }
}

/// `name{label="value",...} value`, or `name value`; label values may hold
/// `\\`, `\"` and `\n` escapes.
pub fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();

    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let (value, after) = quoted(after)?;
            labels.insert(key.to_owned(), value);
            rest = after;
        }
    }

    // The exporter writes no timestamps, so the value is all that is left.
    let value = rest.trim().parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A label value up to its closing quote, unescaped, and what follows.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();

    while let Some((index, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[index + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}
