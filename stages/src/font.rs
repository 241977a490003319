//! The one font every plot draws its text with: DejaVu Sans, vendored in `assets/` (with its
//! licence) and compiled in, so a PNG renders the same on a machine without fontconfig or any
//! system font. plotters' `ab_glyph` text path looks fonts up by family name in a process-wide
//! table, and fails a chart whose family is not there, so every plot calls
//! [`ensure_registered`] first.

use std::sync::OnceLock;

use plotters::style::FontStyle;

/// DejaVu Sans 2.37 (Debian `fonts-dejavu-core`); `assets/DejaVuSans-LICENSE` is its licence.
const DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The family name plots ask for; the SVG files say it too, so a browser uses its own.
pub(crate) const FAMILY: &str = "sans-serif";

/// The vendored font did not parse: a broken checkout, not bad input.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the vendored font `stages/assets/DejaVuSans.ttf` is not a valid TrueType font")]
pub struct FontError;

/// Registers DejaVu Sans as [`FAMILY`], once per process; later calls return the first result.
pub(crate) fn ensure_registered() -> Result<(), FontError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if ok { Ok(()) } else { Err(FontError) }
}
