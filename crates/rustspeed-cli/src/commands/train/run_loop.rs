//! The training loop: steps, metrics, evaluation, checkpoints, Ctrl-C, the plot, the export and
//! the summary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed::lr_schedule::LrScheduleParams;
use rustspeed_comm::Communicator;
use rustspeed_config::DsConfig;
use rustspeed_data::{collate, DataCursor, DataOrder, DataState, PreparedData, Sample};
use rustspeed_kernels::Float;
use rustspeed_models::export::save_pretrained;
use rustspeed_models::hf_config::Architecture;
use rustspeed_models::loader::{build_model, load_model, LoadError};
use rustspeed_models::peft::prefix_batch;
use rustspeed_models::Batch;
use rustspeed_models::{gpt2, llama};
use serde_json::json;

use super::checkpoints::{latest_checkpoint, rotate, truncate_metrics};
use super::plot::write_loss_plot;
use super::source::Source;
use super::{Args, MAX_SHARD_BYTES};
use crate::commands::eval::DataError;
use crate::exit::UsageError;

/// The run stopped on Ctrl-C after saving a checkpoint (exit code 130, as a shell reports
/// SIGINT).
#[derive(Debug, thiserror::Error)]
#[error("interrupted at step {step}; saved {dir}; continue with --resume-from-checkpoint")]
pub struct Interrupted {
    pub step: u64,
    pub dir: String,
}

pub struct Run<'a> {
    pub args: &'a Args,
    pub source: &'a Source,
    pub data: &'a PreparedData,
    pub config: &'a DsConfig,
    pub max_steps: u64,
    pub fallback_schedule: Option<LrScheduleParams>,
    /// The data-parallel group when several ranks run.
    pub comm: Option<Arc<Communicator>>,
    /// LoRA / QLoRA / prompt learning; `None` trains every parameter.
    pub tuning: Option<rustspeed_models::Tuning>,
}

/// The first Ctrl-C asks the loop to save and stop after the current step; a second one exits
/// at once.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (press again to quit now)");
    });
    if let Err(e) = installed {
        tracing::warn!("Ctrl-C will not save a checkpoint: {e}");
    }
    flag
}

/// The engine's batch of `samples`, with `virtual_tokens` virtual-token positions before each
/// sequence for prompt tuning and P-tuning (PEFT prepends the prompt, labels ignored).
fn to_engine_batch(samples: &[&Sample], pad: u32, virtual_tokens: usize) -> Batch {
    let b = collate(samples, pad, None);
    prefix_batch(
        b.batch_size,
        b.seq_len,
        &b.input_ids,
        &b.labels,
        virtual_tokens,
    )
}

/// HF Trainer's eval_loss: the mean over eval batches of each batch's mean token loss,
/// weighted by the batch's number of sequences.
fn evaluate<T: Float>(
    engine: &mut Engine<T>,
    samples: &[Sample],
    batch_size: usize,
    pad: u32,
    virtual_tokens: usize,
) -> anyhow::Result<f64> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for chunk in samples.chunks(batch_size) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let loss = engine.eval_loss(&to_engine_batch(&refs, pad, virtual_tokens))?;
        sum += loss.mean() * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(sum / n.max(1) as f64)
}

impl Run<'_> {
    pub fn train<T: Float>(&self) -> anyhow::Result<()> {
        let args = self.args;
        let t0 = Instant::now();
        let samples = &self.data.train.samples;
        let eval_samples = self.data.eval.as_ref().map(|d| &d.samples[..]);
        let model = if let Some(tuning) = &self.tuning {
            super::peft::load_tuned::<T>(args, tuning)?
        } else if args.from_scratch {
            let cfg = &self.source.config;
            let mut model = build_model::<T>(cfg)?;
            match cfg.architecture {
                Architecture::Gpt2 => gpt2::init_weights(&mut model, cfg, args.seed),
                _ => llama::init_weights(&mut model, cfg, args.seed),
            }
            model
        } else {
            load_model::<T>(&args.model)
                .map_err(|e| match e {
                    LoadError::NotAModel { .. } => anyhow::Error::new(UsageError(e.to_string())),
                    other => anyhow::Error::new(other),
                })?
                .model
        };
        let mut model = model;
        if args.gradient_checkpointing {
            model.enable_gradient_checkpointing();
        }
        let param_count = model.layout.numel();
        let options = EngineOptions {
            seed: args.seed,
            fallback_schedule: self.fallback_schedule.clone(),
            comm: self.comm.clone(),
            ..EngineOptions::default()
        };
        let mut engine = Engine::initialize(model, self.config, options)?;
        let (rank, world) = engine.rank_and_world();
        // Rank 0 writes every file and log; the other ranks only train.
        let main = rank == 0;
        let micro = self.config.micro_batch_size() as usize;
        let global = self.config.train_batch_size() as usize;
        let drop_last = self.config.dataloader_drop_last;
        let num_samples = samples.len();
        if num_samples == 0 || (drop_last && num_samples < global) {
            return Err(DataError(format!(
                "{}: {num_samples} samples are fewer than one global batch ({global}) and dataloader_drop_last is set",
                args.data.display()
            ))
            .into());
        }
        if eval_samples.is_some_and(|e| e.is_empty()) {
            return Err(DataError("the eval data has no samples".into()).into());
        }
        let order = DataOrder {
            num_samples,
            seed: args.seed,
            shuffle: !args.no_shuffle,
            drop_last,
        };
        let steps_per_epoch = order.steps_per_epoch(global);
        if drop_last && !num_samples.is_multiple_of(global) {
            tracing::warn!(
                "dataloader_drop_last: each epoch's last {} samples (fewer than the global batch {global}) are dropped",
                num_samples % global
            );
        }
        let out = &args.output_dir;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let metrics_path = out.join("metrics.jsonl");
        let mut cursor = DataCursor::new(order);
        if let Some(dir) = &args.resume_from_checkpoint {
            cursor = self.resume(&mut engine, dir, order, &metrics_path, main)?;
        } else if main && metrics_path.exists() {
            std::fs::remove_file(&metrics_path)
                .with_context(|| format!("removing {}", metrics_path.display()))?;
        }
        let (mut train_curve, mut eval_curve) = read_curves(&metrics_path);
        let mut metrics = if main {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .with_context(|| format!("opening {}", metrics_path.display()))?,
            )
        } else {
            None
        };
        let mut write_metric = |line: serde_json::Value| match &mut metrics {
            Some(m) => {
                writeln!(m, "{line}").with_context(|| format!("writing {}", metrics_path.display()))
            }
            None => Ok(()),
        };
        if main {
            eprintln!(
            "training {} ({param_count} params, {}) on {num_samples} samples{}: micro batch {micro} x accumulation {} = {global}, {} steps ({steps_per_epoch} per epoch), loaded in {:.1}s",
            args.model.display(),
            T::DTYPE,
            eval_samples.map_or(String::new(), |e| format!(" (+{} eval)", e.len())),
            self.config.gradient_accumulation_steps(),
            self.max_steps,
            t0.elapsed().as_secs_f64()
        );
            if world > 1 {
                eprintln!(
                    "{world} ranks, ZeRO stage {}, each rank trains on its share of every global batch",
                    self.config.zero_stage()
                );
            }
        }

        let bar = if main {
            indicatif::ProgressBar::new(self.max_steps)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
                .expect("a valid template"),
        );
        bar.set_position(engine.global_steps());
        // A hidden bar (stderr not a terminal) drops its println; logs must still appear.
        let log = |line: String| {
            if !main {
            } else if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        };
        let plot_path = out.join("loss.png");
        let title = format!(
            "{} on {}",
            args.model
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy()),
            args.data
                .file_name()
                .map_or("data".into(), |n| n.to_string_lossy())
        );
        let plot = |train: &[(f64, f64)], eval: &[(f64, f64)]| {
            if !main {
                return;
            }
            if let Err(e) = write_loss_plot(&plot_path, &title, train, eval) {
                tracing::warn!("{e:#}");
            }
        };
        let interrupted = interrupt_flag();
        let pad = self.source.tokenizer.eos_token_id().unwrap_or(0);
        let n_virtual = self.tuning.as_ref().map_or(0, |t| t.virtual_tokens());
        let print_every = self.config.steps_per_print;
        let eval_every = args.eval_steps.unwrap_or(args.logging_steps);
        let (mut total_tokens, t_train) = (0u64, Instant::now());
        let mut last_eval: Option<(u64, f64)> = None;
        let mut last_saved = None;
        // Rank 0 evaluates; at ZeRO stage 3 every rank does, since each layer is gathered.
        let eval_samples = eval_samples.filter(|_| main || engine.params_partitioned());
        if let Some(eval) = eval_samples.filter(|_| args.eval_on_start) {
            if engine.global_steps() == 0 {
                let loss = evaluate(
                    &mut engine,
                    eval,
                    args.per_device_eval_batch_size,
                    pad,
                    n_virtual,
                )?;
                write_metric(json!({ "step": 0, "eval_loss": loss }))?;
                eval_curve.push((0.0, loss));
                log(format!("step 0: eval_loss {loss:.4}"));
            }
        }
        while engine.global_steps() < self.max_steps {
            let step = cursor.next_step(global);
            let batches: Vec<Batch> = step
                .for_rank(rank, world)
                .chunks(micro)
                .map(|idx| {
                    let refs: Vec<&Sample> = idx.iter().map(|&i| &samples[i]).collect();
                    to_engine_batch(&refs, pad, n_virtual)
                })
                .collect();
            let tokens: u64 = step.samples.iter().map(|&i| samples[i].len() as u64).sum();
            let t = Instant::now();
            let report = engine.train_partial_batch(batches)?;
            let secs = t.elapsed().as_secs_f64();
            total_tokens += tokens;
            let n = report.step.global_step;
            let epoch =
                cursor.state().epoch as f64 + cursor.state().index as f64 / num_samples as f64;
            write_metric(json!({
                "step": n,
                "epoch": epoch,
                "loss": report.loss,
                "lr": report.step.lr,
                "grad_norm": finite_or_null(report.step.grad_norm),
                "loss_scale": report.step.loss_scale,
                "skipped": report.step.skipped,
                "tokens": tokens,
                "tokens_per_second": tokens as f64 / secs.max(1e-9),
            }))?;
            train_curve.push((n as f64, report.loss as f64));
            bar.set_position(n);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                report.loss,
                report.step.lr,
                tokens as f64 / secs.max(1e-9)
            ));
            if n % args.logging_steps == 0 || print_every.is_some_and(|p| p > 0 && n % p == 0) {
                log(format!(
                    "step {n}: loss {:.4}, lr {:.3e}, grad_norm {:.4}, loss_scale {}, {:.0} tokens/s",
                    report.loss,
                    report.step.lr,
                    report.step.grad_norm,
                    report.step.loss_scale,
                    tokens as f64 / secs.max(1e-9)
                ));
            }
            let last = n == self.max_steps;
            if let Some(eval) = eval_samples.filter(|_| n % eval_every == 0 || last) {
                let loss = evaluate(
                    &mut engine,
                    eval,
                    args.per_device_eval_batch_size,
                    pad,
                    n_virtual,
                )?;
                write_metric(json!({ "step": n, "eval_loss": loss }))?;
                eval_curve.push((n as f64, loss));
                last_eval = Some((n, loss));
                log(format!("step {n}: eval_loss {loss:.4}"));
            }
            let mut stop = interrupted.load(Ordering::SeqCst);
            if let Some(c) = &self.comm {
                // Every rank must agree to stop at the same step: the save is collective.
                let mut flag = [if stop { 1f32 } else { 0f32 }];
                c.all_reduce(&mut flag, rustspeed_comm::ReduceOp::Max)?;
                stop = flag[0] > 0.0;
            }
            if (args.save_steps > 0 && n % args.save_steps == 0) || stop {
                let dir = out.join(format!("checkpoint-{n}"));
                engine.save_checkpoint(&dir, None, json!({ "data": cursor.state() }))?;
                log(format!("saved {}", dir.display()));
                last_saved = Some(dir);
                if let Some(limit) = args.save_total_limit.filter(|_| main) {
                    for d in rotate(out, limit)? {
                        tracing::info!("--save-total-limit {limit}: deleted {}", d.display());
                    }
                }
                plot(&train_curve, &eval_curve);
            }
            if stop {
                bar.abandon();
                let dir = last_saved.expect("saved above");
                return Err(Interrupted {
                    step: n,
                    dir: dir.display().to_string(),
                }
                .into());
            }
        }
        bar.finish_and_clear();
        let train_secs = t_train.elapsed().as_secs_f64();
        // Measured before the export gathers the whole parameters (ZeRO-3).
        let bytes = engine.model_state_bytes();
        if world > 1 {
            // Each rank's own figure (the launcher prefixes its rank), next to the memory
            // model's for this stage and world size, which it must equal.
            let expected = engine
                .expected_model_state_bytes()
                .map_or("unknown".into(), |b| human_bytes(b.total));
            eprintln!(
                "rank {rank} of {world}, ZeRO stage {}: model states {} (weights {} + grads {} + fp32 master {} + optimizer {}); memory model {expected}",
                self.config.zero_stage(),
                human_bytes(bytes.total),
                human_bytes(bytes.weights),
                human_bytes(bytes.grads),
                human_bytes(bytes.master),
                human_bytes(bytes.optimizer),
            );
        }
        // A collective at stage 3: every rank gathers the parameters the export writes.
        engine.materialize_params()?;
        if !main {
            return Ok(());
        }
        plot(&train_curve, &eval_curve);

        let final_dir = out.join("final");
        self.export(&engine, &final_dir)?;
        let s = &self.data.train.summary;
        println!(
            "trained {} steps, {total_tokens} tokens in {train_secs:.1}s ({:.0} tokens/s); peak RSS {}; model states {} (weights {} + grads {} + fp32 master {} + optimizer {})",
            engine.global_steps(),
            total_tokens as f64 / train_secs.max(1e-9),
            rustspeed::rss::peak_rss_bytes().map_or("unknown".into(), human_bytes),
            human_bytes(bytes.total),
            human_bytes(bytes.weights),
            human_bytes(bytes.grads),
            human_bytes(bytes.master),
            human_bytes(bytes.optimizer),
        );
        println!(
            "data: {} records -> {} samples ({} truncated, {} skipped as malformed, {} without labels dropped)",
            s.records, s.samples, s.truncated_samples, s.skipped_records, s.dropped_without_labels
        );
        if let Some((step, loss)) = last_eval {
            println!("eval_loss {loss:.4} at step {step}");
        }
        println!(
            "exported {}; metrics {}; plot {}",
            final_dir.display(),
            out.join("metrics.jsonl").display(),
            plot_path.display()
        );
        Ok(())
    }

    fn resume<T: Float>(
        &self,
        engine: &mut Engine<T>,
        dir: &str,
        order: DataOrder,
        metrics_path: &Path,
        main: bool,
    ) -> anyhow::Result<DataCursor> {
        let dir = if dir.is_empty() {
            latest_checkpoint(&self.args.output_dir)?
        } else {
            PathBuf::from(dir)
        };
        if !dir.is_dir() {
            return Err(UsageError(format!(
                "--resume-from-checkpoint {}: no such directory",
                dir.display()
            ))
            .into());
        }
        let client = engine
            .load_checkpoint(&dir, None)?
            .ok_or_else(|| UsageError(format!("{}: no checkpoint found", dir.display())))?;
        let state: DataState = serde_json::from_value(client["data"].clone()).map_err(|e| {
            UsageError(format!(
                "{}: no data cursor in the checkpoint's client state ({e}); it was not written by rustspeed train",
                dir.display()
            ))
        })?;
        let cursor = DataCursor::resume(order, state).map_err(|e| DataError(e.to_string()))?;
        if main {
            truncate_metrics(metrics_path, engine.global_steps())?;
        }
        tracing::info!(
            "resumed from {} at step {}",
            dir.display(),
            engine.global_steps()
        );
        Ok(cursor)
    }

    /// `OUT/final`: an HF directory transformers and vLLM load.
    fn export<T: Float>(&self, engine: &Engine<T>, final_dir: &Path) -> anyhow::Result<()> {
        if self.tuning.is_some() {
            return super::peft::export_adapter(self.args, engine.model(), final_dir);
        }
        save_pretrained(
            final_dir,
            &self.source.config_json,
            engine.model(),
            T::DTYPE,
            self.source.hf_dir.as_deref(),
            MAX_SHARD_BYTES,
        )?;
        if self.source.hf_dir.is_none() {
            // A GGUF's tokenizer lives in its metadata; the HF directory needs it as a file.
            let text = self
                .source
                .tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
            std::fs::write(final_dir.join("tokenizer.json"), text)
                .with_context(|| format!("writing {}/tokenizer.json", final_dir.display()))?;
        }
        Ok(())
    }
}

/// (step, loss) points of a loss curve.
type Curve = Vec<(f64, f64)>;

/// The curves already in metrics.jsonl (a resumed run's plot shows the whole run).
fn read_curves(path: &Path) -> (Curve, Curve) {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        } else if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    (train, eval)
}

/// Bytes in the largest binary unit that keeps the number at least 1.
fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// A skipped step's norm is inf/NaN, which JSON cannot hold.
fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}
