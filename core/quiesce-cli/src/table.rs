//! Tables for a terminal, safe whatever a writer, a hook or a node sends: every cell is one line
//! of printable text, cut to a width a terminal can show; `--json` has the full text.

use comfy_table::{presets::NOTHING, Table};

/// The most characters a cell shows; longer text is cut with `…` (use `--json` for all of it).
pub const MAX_CELL_CHARS: usize = 160;

/// One line of printable text: control characters (newlines, tabs, escape sequences a hook may
/// print) become spaces, runs of them one; cut to [`MAX_CELL_CHARS`].
pub fn cell(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    let mut last_space = false;
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        if chars == MAX_CELL_CHARS {
            out.push('…');
            return out;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// Left-aligned columns two spaces apart, as wide as their widest cell, each line after
/// `indent`, no trailing spaces.
pub fn render<const N: usize>(indent: &str, header: &[String; N], rows: &[[String; N]]) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(header.iter().map(|h| cell(h)));
    for row in rows {
        table.add_row(row.iter().map(|c| cell(c)));
    }
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i + 1 < N { 2 } else { 0 }));
    }
    table
        .lines()
        .map(|line| format!("{indent}{}\n", line.trim_end()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_two_spaces_apart() {
        let header = ["NODE", "WRITER"].map(String::from);
        let rows = [
            ["node1", "hello"].map(String::from),
            ["n2", "records"].map(String::from),
        ];
        assert_eq!(
            render("  ", &header, &rows),
            "  NODE   WRITER\n  node1  hello\n  n2     records\n"
        );
    }

    #[test]
    fn what_a_writer_sends_cannot_break_the_table() {
        // 70 KB of hook output with newlines and escape codes; a 100 KB name.
        let output = "line\n\x1b[31mred\x1b[0m\t".repeat(7000);
        let shown = cell(&output);
        assert!(
            shown.chars().count() <= MAX_CELL_CHARS + 1,
            "{}",
            shown.len()
        );
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.ends_with('…'));
        let header = ["NAME", "FAILURE"].map(String::from);
        let rows = [["x".repeat(100_000), output]];
        let text = render("", &header, &rows);
        assert_eq!(text.lines().count(), 2);
        assert!(text
            .lines()
            .all(|l| l.chars().count() < 2 * MAX_CELL_CHARS + 8));
    }
}
