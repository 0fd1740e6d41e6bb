//! The manual pages, `unionfs.1` and `unionfs-SUBCOMMAND.1`, made from the
//! command line's own definitions by clap_mangen; the text after each help
//! (how a command ends, its logs, exit status, the fuse-overlayfs form) is
//! rendered here as roff paragraphs, its indented blocks kept line for line.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use clap::Command;

/// Writes a page for `top` and one per subcommand into `dir` (made if
/// missing, mode 0755; pages 0644). `top` must not list a `help`
/// subcommand, which has no page.
pub fn write_pages(top: &Command, dir: &Path) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let name = top.get_name().to_string();
    let mut pages = vec![(name.clone(), top.clone(), "THE FUSE-OVERLAYFS COMMAND LINE")];
    for sub in top.get_subcommands() {
        let page = format!("{name}-{}", sub.get_name());
        let shown = format!("{name} {}", sub.get_name());
        pages.push((
            page.clone(),
            sub.clone().name(page).bin_name(shown),
            "DETAILS",
        ));
    }
    for (page, cmd, heading) in pages {
        let text = render(&cmd, heading).map_err(|e| format!("cannot render {page}.1: {e}"))?;
        let path = dir.join(format!("{page}.1"));
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)
            .and_then(|mut f| f.write_all(&text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// One page: clap_mangen's sections, with the after-help text under
/// `heading` in place of its reflowed EXTRA section.
fn render(cmd: &Command, heading: &str) -> std::io::Result<Vec<u8>> {
    let after = cmd.get_after_help().map(|t| t.to_string());
    let cmd = cmd
        .clone()
        .after_help(None::<&str>)
        .after_long_help(None::<&str>);
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    if let Some(text) = after {
        out.extend_from_slice(format!(".SH \"{heading}\"\n").as_bytes());
        out.extend_from_slice(roff_paragraphs(&text).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}

/// Blank-line separated paragraphs as roff: a paragraph with an indented
/// line is kept as written (`.nf`), the others are filled.
fn roff_paragraphs(text: &str) -> String {
    let mut out = String::new();
    for para in text
        .split("\n\n")
        .map(str::trim_end)
        .filter(|p| !p.trim().is_empty())
    {
        let preformatted = para.lines().skip(1).any(|l| l.starts_with(' '));
        out.push_str(".PP\n");
        if preformatted {
            out.push_str(".nf\n");
        }
        for line in para.lines() {
            out.push_str(&escape(line));
            out.push('\n');
        }
        if preformatted {
            out.push_str(".fi\n");
        }
    }
    out
}

/// A line of text as roff reads it literally: backslashes and minus signs
/// escaped, a leading control character neutralised.
fn escape(line: &str) -> String {
    let body = line.replace('\\', "\\e").replace('-', "\\-");
    match body.starts_with(['.', '\'']) {
        true => format!("\\&{body}"),
        false => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indented_blocks_keep_their_lines_and_text_is_escaped() {
        let r =
            roff_paragraphs("Ending: one\nparagraph.\n\nusage: x [-o A]\n  -f   stay\n\n.dot \\n");
        assert_eq!(
            r,
            ".PP\nEnding: one\nparagraph.\n.PP\n.nf\nusage: x [\\-o A]\n  \\-f   stay\n.fi\n.PP\n\\&.dot \\en\n"
        );
    }
}
