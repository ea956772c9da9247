//! The names `docs/contracts.md` fixes, read from the page itself so that the bundle and the
//! contract cannot drift apart silently.

use std::collections::BTreeSet;

/// The contract page.
pub fn contracts_page() -> String {
    let path = crate::repo_path("docs/contracts.md");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

/// The spans between backticks of `text`.
fn code_spans(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// Every environment variable the page names (`FLASH_SALE_*`, `RUST_LOG`).
pub fn env_vars() -> BTreeSet<String> {
    let page = contracts_page();
    let mut names = BTreeSet::new();
    for span in code_spans(&page) {
        for word in span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("FLASH_SALE_") && word.len() > "FLASH_SALE_".len()
                || word == "RUST_LOG"
            {
                names.insert(word.to_owned());
            }
        }
    }
    names
}

/// Every metric name of the page's "Metrics" section. A histogram (a name ending in
/// `_seconds`) stands for its `_bucket`, `_sum` and `_count` series too. Label values follow a
/// `;` on their line (`... counter; outcome in ...`) and are left out.
pub fn metrics() -> BTreeSet<String> {
    let page = contracts_page();
    let section = page
        .split("\n## ")
        .find(|section| section.starts_with("Metrics"))
        .expect("docs/contracts.md has a Metrics section");
    let mut names = BTreeSet::new();
    let spans = section
        .lines()
        .flat_map(|line| code_spans(line.split(';').next().unwrap_or_default()));
    for span in spans {
        let name: String = span
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        if name.is_empty() || name.starts_with('_') || !name.contains('_') {
            continue;
        }
        if name.ends_with("_seconds") {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}
