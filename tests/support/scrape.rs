//! Reading stowage's `/metrics`: the Prometheus text format parsed into series, so tests can
//! assert exact counter values by name and labels.

use std::collections::BTreeMap;

/// An expected sample: metric name, labels it must carry (others are summed over), value.
pub type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// `(name, labels) -> value`, for every sample line.
    pub series: Vec<(String, BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Scrape {
    /// `GET <base>/metrics`, which must answer 200.
    pub fn get(base_url: &str) -> Scrape {
        let resp = super::http()
            .get(format!("{base_url}/metrics"))
            .send()
            .expect("GET /metrics");
        assert_eq!(resp.status().as_u16(), 200, "GET {base_url}/metrics");
        Scrape::parse(&resp.text().expect("read /metrics"))
    }

    pub fn parse(text: &str) -> Scrape {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n.to_string(), parse_labels(rest.trim_end_matches('}'))),
                None => (head.to_string(), BTreeMap::new()),
            };
            series.push((name, labels, value));
        }
        Scrape {
            series,
            text: text.to_string(),
        }
    }

    /// Sum of the series named `name` whose labels include every pair of `labels`, or `None`
    /// when no such series is exported.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`find`](Self::find), but the series must exist.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?} in /metrics:\n{}",
                self.metric_lines(name)
            )
        })
    }

    /// Asserts every `(name, labels, value)` at once; the failure lists each mismatch.
    pub fn assert_values(&self, context: &str, expected: &[Expected]) {
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(name, labels, want)| {
                let got = self.find(name, labels);
                (got != Some(*want)).then(|| format!("{name}{labels:?}: {got:?}, expected {want}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{context}:\n{}", wrong.join("\n"));
    }

    /// Every label value of `label` on series named `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .series
            .iter()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, l, _)| l.get(label).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The sample lines of one metric, for failure messages.
    pub fn metric_lines(&self, name: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with(name))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}
