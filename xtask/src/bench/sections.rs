//! Sections of benchmarks.md that a bench other than the sweep writes (`--nodeport`,
//! `--flood`), each between its own markers: a bench replaces only its own section, and the
//! sweep keeps them all when it writes the file again.
use std::path::Path;

use anyhow::{Context as _, Result};

/// A section's markers.
pub struct Marked {
    pub begin: &'static str,
    pub end: &'static str,
}

/// Every bench's section, in the order they follow the sweep's report.
pub const ALL: [&Marked; 2] = [&super::nodeport::SECTION, &super::flood::SECTION];

impl Marked {
    /// The section in `text`, markers included.
    pub fn find<'a>(&self, text: &'a str) -> Option<&'a str> {
        self.bounds(text).map(|(begin, end)| &text[begin..end])
    }

    fn bounds(&self, text: &str) -> Option<(usize, usize)> {
        let begin = text.find(self.begin)?;
        let end = text[begin..].find(self.end)? + begin + self.end.len();
        Some((begin, end))
    }

    /// Puts `table` between the markers in `file` (appended with them when they are
    /// missing).
    pub fn write(&self, file: &Path, table: &str) -> Result<()> {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let section = format!("{}\n{table}{}\n", self.begin, self.end);
        let new = match self.bounds(&text) {
            Some((begin, end)) => format!(
                "{}{section}{}",
                &text[..begin],
                text[end..].trim_start_matches('\n')
            ),
            None => format!("{}\n\n{section}", text.trim_end()),
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(file, new).with_context(|| format!("writing {}", file.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKED: Marked = Marked {
        begin: "<!-- x:begin -->",
        end: "<!-- x:end -->",
    };

    #[test]
    fn the_section_is_replaced_in_place_and_kept_by_its_markers() {
        let file = std::env::temp_dir().join(format!("lb-sections-{}.md", std::process::id()));
        std::fs::write(&file, "# Bench\n\nsweep\n").unwrap();
        MARKED.write(&file, "first\n").unwrap();
        std::fs::write(&file, std::fs::read_to_string(&file).unwrap() + "\nafter\n").unwrap();
        MARKED.write(&file, "second\n").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        let (begin, end) = (MARKED.begin, MARKED.end);
        assert_eq!(
            text,
            format!("# Bench\n\nsweep\n\n{begin}\nsecond\n{end}\nafter\n")
        );
        assert_eq!(
            MARKED.find(&text),
            Some(format!("{begin}\nsecond\n{end}").as_str())
        );
    }
}
