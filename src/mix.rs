//! `autoscale mix`: the mixture math on results from any trainer (being written).

use clap::Args;

use crate::render::Failure;

#[derive(Debug, Args)]
pub struct MixArgs {}

pub fn run(_args: MixArgs, _json: bool) -> Result<u8, Failure> {
    Err(Failure::usage("`autoscale mix` is not built yet", "see issue 5"))
}
