//! `mitune chat --model DIR [--image PATH]`: a terminal conversation through the model's chat template, the
//! answer streamed as it is generated. Lines starting with `/` are commands: `/image PATH` attaches an image to
//! the next message, `/video DIR` a clip (a directory of frames; video models), `/reset` forgets the conversation,
//! `/quit` (or end of input) leaves.
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use super::generate::{Sampling, Stream};
use crate::data::sources::Role;
use crate::data::templates;
use crate::error::{Error, Result};
use crate::generate::{Prompt, cut_at_stop, generate_batch, stop_ids};
use crate::recipe::schema::Template;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (LlavaForConditionalGeneration layout, with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// An image for the first message (more with `/image PATH`).
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// A clip (a directory of frames) for the first message, for a video model (Qwen2-VL); more with `/video DIR`.
    #[arg(long)]
    pub video: Vec<PathBuf>,
    /// Chat template: the checkpoint's own (`tokenizer`) or a built-in one (plain, vicuna_v1, llama_2, chatml).
    #[arg(long, default_value = "tokenizer")]
    pub template: Template,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: Sampling,
}

const HELP: &str = "commands: /image PATH (attach to the next message), /video DIR (a clip's frames), /reset, /quit";

pub fn run(a: Args) -> Result<()> {
    let device = crate::default_device();
    let built = crate::model::load_dir(&a.model, &device)?;
    let template = templates::source(a.template, &built.text).map_err(|m| {
        Error::input(format!(
            "{m}: pass --template vicuna_v1 (LLaVA-1.5), llama_2, chatml or plain"
        ))
    })?;
    let cfg = a
        .sampling
        .config(a.max_new_tokens, stop_ids(&built.model, &built.text))?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("mitune chat: {} ({HELP})", a.model.display());
    }
    let mut history: Vec<(Role, String)> = vec![];
    let mut images: Vec<PathBuf> = vec![];
    let mut pending: Vec<PathBuf> = a.image.clone();
    let mut clips: Vec<PathBuf> = vec![];
    let mut pending_clips: Vec<PathBuf> = a.video.clone();
    if !pending_clips.is_empty() && built.text.video_token.is_none() {
        return Err(Error::input(
            "this checkpoint does not read videos (only Qwen2-VL / Qwen2.5-VL checkpoints do): drop --video",
        ));
    }
    let mut turn = 0u64;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("you> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::input(format!("cannot read standard input: {e}")))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    history.clear();
                    images.clear();
                    pending.clear();
                    clips.clear();
                    pending_clips.clear();
                    eprintln!("(conversation cleared)");
                }
                "image" if !arg.trim().is_empty() => {
                    let p = PathBuf::from(arg.trim());
                    // decode now, so a bad path is reported before the message that uses it
                    match crate::data::images::load_image(&p) {
                        Ok(_) => {
                            pending.push(p);
                            eprintln!("(image attached to your next message)");
                        }
                        Err(e) => eprintln!("error: {e}"),
                    }
                }
                "video" if !arg.trim().is_empty() => {
                    let p = PathBuf::from(arg.trim());
                    // list its frames now, so a bad directory is reported before the message that uses it
                    match (
                        &built.text.video_token,
                        crate::data::video::ClipSource::Dir(p.clone()).frames(),
                    ) {
                        (None, _) => eprintln!("error: this checkpoint does not read videos"),
                        (_, Err(e)) => eprintln!("error: {e}"),
                        (_, Ok(f)) => {
                            pending_clips.push(p);
                            eprintln!("(clip of {} frames attached to your next message)", f.len());
                        }
                    }
                }
                _ => eprintln!("{HELP}"),
            }
            continue;
        }
        let mut content = String::new();
        for _ in &pending {
            content.push_str("<image>\n");
        }
        for _ in &pending_clips {
            content.push_str(crate::data::tokenizer::VIDEO_MARKER);
            content.push('\n');
        }
        content.push_str(line);
        history.push((Role::User, content));
        images.append(&mut pending);
        clips.append(&mut pending_clips);
        let prompt = templates::prompt(&built.text, &template, &history).map_err(Error::input)?;
        let (pixels, sizes) = built.images.batch_sized(&images, &device)?;
        let videos = super::generate::clips(&clips, &built.model.spec, &built.images, &device)?;
        let tokens = super::generate::clip_tokens(&videos, &built.model.spec);
        let ids = built.text.encode_media(&prompt, false, &sizes, &tokens)?;
        if interactive {
            eprint!("assistant> ");
        }
        let mut stream = Stream::new(&built.text, &cfg.stop);
        let out = generate_batch(
            &built.model,
            vec![Prompt {
                instructions: built
                    .text
                    .instructions(history.iter().map(|(_, c)| c.as_str()))?,
                ids,
                pixels,
                sizes,
                videos,
                index: turn,
            }],
            &cfg,
            Some(&|ids: &[i64]| built.text.decode(ids)),
            |_, id| {
                if !cfg.eos.contains(&id) {
                    stream.push(id)
                }
            },
        )?;
        stream.finish();
        println!();
        let mut ids = out.into_iter().next().unwrap_or_default().output_ids;
        ids.retain(|i| !cfg.eos.contains(i));
        let answer = cut_at_stop(&built.text.decode(&ids), &cfg.stop)
            .trim()
            .to_string();
        history.push((Role::Assistant, answer));
        turn += 1;
    }
    Ok(())
}
