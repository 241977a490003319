//! The report as a list of blocks, rendered twice: as markdown (`report.md`) and as one
//! self-contained HTML page (`report.html`, plots inline). One model, so the two never disagree.
//!
//! Inline text may use two markdown spans, `code` and **bold**; the HTML renderer turns them
//! into `<code>` and `<strong>` and escapes everything else.

use std::fmt::Write as _;

/// One piece of the report, in reading order.
#[derive(Debug, Clone)]
pub(super) enum Block {
    /// `level` 2 or 3; the title is the document's only level 1.
    Heading {
        level: u8,
        text: String,
    },
    Paragraph(String),
    Bullets(Vec<String>),
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// A plot: `file` is the SVG beside the report (markdown links it), `svg` its text (HTML
    /// inlines it).
    Figure {
        file: String,
        caption: String,
        svg: String,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Document {
    pub title: String,
    pub blocks: Vec<Block>,
}

impl Document {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            blocks: Vec::new(),
        }
    }

    pub fn heading(&mut self, level: u8, text: impl Into<String>) {
        self.blocks.push(Block::Heading {
            level,
            text: text.into(),
        });
    }

    pub fn paragraph(&mut self, text: impl Into<String>) {
        self.blocks.push(Block::Paragraph(text.into()));
    }

    pub fn bullets(&mut self, items: Vec<String>) {
        if !items.is_empty() {
            self.blocks.push(Block::Bullets(items));
        }
    }

    pub fn table(&mut self, header: Vec<String>, rows: Vec<Vec<String>>) {
        self.blocks.push(Block::Table { header, rows });
    }

    pub fn figure(&mut self, file: String, caption: String, svg: String) {
        self.blocks.push(Block::Figure { file, caption, svg });
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("# {}\n", self.title);
        for block in &self.blocks {
            out.push('\n');
            match block {
                Block::Heading { level, text } => {
                    let hashes = "#".repeat(usize::from((*level).clamp(2, 6)));
                    let _ = writeln!(out, "{hashes} {text}");
                }
                Block::Paragraph(text) => {
                    let _ = writeln!(out, "{text}");
                }
                Block::Bullets(items) => {
                    for item in items {
                        let _ = writeln!(out, "- {item}");
                    }
                }
                Block::Table { header, rows } => {
                    let cells = |row: &[String]| {
                        row.iter()
                            .map(|c| c.replace('|', "\\|"))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    };
                    let _ = writeln!(out, "| {} |", cells(header));
                    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
                    for row in rows {
                        let _ = writeln!(out, "| {} |", cells(row));
                    }
                }
                Block::Figure { file, caption, .. } => {
                    let alt = file.trim_end_matches(".svg");
                    let _ = writeln!(out, "![{alt}]({file})");
                    let _ = writeln!(out, "\n*{caption}*");
                }
            }
        }
        out
    }

    pub fn html(&self) -> String {
        let mut out =
            String::from("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        let _ = writeln!(out, "<title>{}</title>", escape(&self.title));
        out.push_str(STYLE);
        out.push_str("</head>\n<body>\n");
        let _ = writeln!(out, "<h1>{}</h1>", inline(&self.title));
        for block in &self.blocks {
            match block {
                Block::Heading { level, text } => {
                    let level = (*level).clamp(2, 6);
                    let _ = writeln!(out, "<h{level}>{}</h{level}>", inline(text));
                }
                Block::Paragraph(text) => {
                    let _ = writeln!(out, "<p>{}</p>", inline(text));
                }
                Block::Bullets(items) => {
                    out.push_str("<ul>\n");
                    for item in items {
                        let _ = writeln!(out, "<li>{}</li>", inline(item));
                    }
                    out.push_str("</ul>\n");
                }
                Block::Table { header, rows } => {
                    out.push_str("<table>\n<thead><tr>");
                    for cell in header {
                        let _ = write!(out, "<th>{}</th>", inline(cell));
                    }
                    out.push_str("</tr></thead>\n<tbody>\n");
                    for row in rows {
                        out.push_str("<tr>");
                        for cell in row {
                            let _ = write!(out, "<td>{}</td>", inline(cell));
                        }
                        out.push_str("</tr>\n");
                    }
                    out.push_str("</tbody>\n</table>\n");
                }
                Block::Figure { caption, svg, .. } => {
                    // The SVG's own XML prolog, if any, is not allowed inside HTML.
                    let body = svg.find("<svg").map_or(svg.as_str(), |start| &svg[start..]);
                    let _ = writeln!(
                        out,
                        "<figure>\n{body}\n<figcaption>{}</figcaption>\n</figure>",
                        inline(caption)
                    );
                }
            }
        }
        out.push_str("</body>\n</html>\n");
        out
    }
}

const STYLE: &str = "<style>
body { font-family: sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 0.2em; }
</style>
";

/// Escapes text for HTML element content and attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escaped text with `code` and **bold** spans as HTML; an unpaired marker stays literal.
fn inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let next = [("`", "code"), ("**", "strong")]
            .into_iter()
            .filter_map(|(marker, tag)| rest.find(marker).map(|at| (at, marker, tag)))
            .min_by_key(|(at, _, _)| *at);
        let Some((at, marker, tag)) = next else {
            out.push_str(&escape(rest));
            break;
        };
        let after = &rest[at + marker.len()..];
        match after.find(marker) {
            Some(end) => {
                out.push_str(&escape(&rest[..at]));
                let _ = write!(out, "<{tag}>{}</{tag}>", escape(&after[..end]));
                rest = &after[end + marker.len()..];
            }
            None => {
                out.push_str(&escape(rest));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_spans_become_tags_and_the_rest_is_escaped() {
        assert_eq!(
            inline("**AutoScale** <beats> `uniform` & a*b"),
            "<strong>AutoScale</strong> &lt;beats&gt; <code>uniform</code> &amp; a*b"
        );
        assert_eq!(inline("a ` b"), "a ` b");
    }

    #[test]
    fn tables_render_in_both_formats_and_pipes_are_escaped_in_markdown() {
        let mut doc = Document::new("T");
        doc.table(
            vec!["a".into(), "b".into()],
            vec![vec!["x|y".into(), "1".into()]],
        );
        let md = doc.markdown();
        assert!(md.contains("| a | b |\n|---|---|\n| x\\|y | 1 |"), "{md}");
        let html = doc.html();
        assert!(html.contains("<td>x|y</td><td>1</td>"), "{html}");
    }
}
