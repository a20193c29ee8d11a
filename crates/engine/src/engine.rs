//! The async handle to a loaded model and its inference thread.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, watch};

use crate::chat::{ChatMessage, ChatTemplate, PromptInput};
use crate::gguf::check_gguf_file;
use crate::request::{GenerationEvent, GenerationRequest};
use crate::sampling::TokenId;
use crate::score::{ScoreRequest, ScoreResult};
use crate::token_text::TokenTable;
use crate::worker::{Command, Worker};
use crate::EngineError;

/// How to run a model on this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Concurrent sequences (continuous-batching slots).
    pub slots: u32,
    /// Context tokens each slot may hold (prompt + generated).
    pub ctx_per_slot: u32,
    /// CPU threads for llama.cpp.
    pub threads: u32,
    /// Maximum tokens in one decode call (prompt chunks share it with decoding sequences).
    pub batch_tokens: u32,
    /// Requests that may wait for a slot before `generate` answers `Overloaded`.
    pub max_waiting: u32,
}

impl EngineConfig {
    /// Defaults suited to a small CPU node: 8 slots of 2048 tokens, all cores.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            slots: 8,
            ctx_per_slot: 2048,
            threads: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(2),
            batch_tokens: 512,
            max_waiting: 256,
        }
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Config(m.to_string()));
        if self.slots == 0 || self.slots > 256 {
            return bad("slots must be between 1 and 256");
        }
        if self.ctx_per_slot < 16 {
            return bad("ctx_per_slot must be at least 16 tokens");
        }
        if self.threads == 0 {
            return bad("threads must be at least 1");
        }
        if self.batch_tokens < self.slots {
            return bad("batch_tokens must be at least the number of slots");
        }
        Ok(())
    }
}

/// What the rest of the system needs to know about the loaded model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// `general.name` from the GGUF metadata, or the file stem.
    pub name: String,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub slots: u32,
    pub ctx_per_slot: u32,
    pub has_chat_template: bool,
}

/// Engine counters, published after every decode step.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub slots_total: u32,
    /// Slots holding a sequence right now.
    pub slots_busy: u32,
    /// Current cap on active sequences (lowered by the governor's throttle).
    pub max_active: u32,
    pub queued: u32,
    /// Decode calls so far.
    pub steps: u64,
    /// Sequences that had tokens in the most recent decode call.
    pub last_batch_sequences: u32,
    pub last_batch_tokens: u32,
    pub tokens_generated: u64,
    /// Sequences dropped because their consumer went away.
    pub cancelled: u64,
    /// Steps that prefilled only interactive prompts while other sequences waited.
    pub interactive_prefill_steps: u64,
}

/// Throttle knobs the vehicle governor turns while the car is hot or power-limited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// At most this many sequences decode at once (1..=slots).
    pub max_active: u32,
    /// Fraction of wall time spent computing (0.05..=1).
    pub duty_cycle: f32,
}

struct Inner {
    model: Arc<LlamaModel>,
    tokens: Arc<TokenTable>,
    commands: mpsc::Sender<Command>,
    stats: watch::Receiver<EngineStats>,
    template: Option<ChatTemplate>,
    info: ModelInfo,
    max_waiting: u32,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnects when the inference thread ends (its sender lives on that thread).
    thread_done: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping the last engine handle waits for the inference thread to end.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Drop for Inner {
    /// Closes the command channel (the worker ends once its running sequences are done or
    /// dropped) and waits for the thread, at most [`STOP_TIMEOUT`]: llama.cpp must not be torn
    /// down under a running decode (a process exiting right after did that: SIGSEGV), and the
    /// next user of the cores (a benchmark's reference run) should not share them with it.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        let Some(thread) = self.thread.take() else {
            return;
        };
        // One blocking wait, no polling: a waking poller steals the cores from llama.cpp's
        // threads, whose barriers then stall (measured: seconds per token).
        let done = match self.thread_done.get_mut() {
            Ok(done) => done.recv_timeout(STOP_TIMEOUT),
            Err(poisoned) => poisoned.into_inner().recv_timeout(STOP_TIMEOUT),
        };
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done {
            tracing::warn!(model = %self.info.name, "engine thread still running {STOP_TIMEOUT:?} after its last handle was dropped (a generation stream is still held); leaving it");
            return;
        }
        if thread.join().is_err() {
            tracing::error!(model = %self.info.name, "engine thread panicked");
        }
    }
}

/// A loaded model with its inference thread. Cheap to clone; the thread stops when the last
/// clone is dropped and the running sequences have ended or been dropped, and dropping the
/// last clone waits for that (bounded).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

/// llama.cpp's backend may be initialised once per process.
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Context(format!("backend init: {e}")))
}

impl Engine {
    /// Loads the model and starts the inference thread. Blocking (reads the model file): call
    /// it from `spawn_blocking` or before the async runtime starts.
    pub fn load(config: EngineConfig) -> Result<Self, EngineError> {
        config.validate()?;
        check_gguf_file(&config.model_path)?;
        let backend = backend()?;
        let model =
            LlamaModel::load_from_file(backend, &config.model_path, &LlamaModelParams::default())
                .map_err(|_| EngineError::ModelLoad {
                path: config.model_path.clone(),
            })?;
        let model = Arc::new(model);
        let info = model_info(&model, &config);
        let tokens = token_table(&model);
        let template = match model.meta_val_str("tokenizer.chat_template") {
            Ok(source) => {
                let vocab = model.vocab();
                let special = |t: LlamaToken| {
                    String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
                };
                Some(ChatTemplate::new(
                    &source,
                    &special(vocab.bos()),
                    &special(vocab.eos()),
                )?)
            }
            Err(_) => None,
        };

        let (commands, command_rx) = mpsc::channel(config.max_waiting.max(1) as usize);
        let (stats_tx, stats) = watch::channel(EngineStats {
            slots_total: config.slots,
            max_active: config.slots,
            ..Default::default()
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), EngineError>>(1);
        let thread_model = Arc::clone(&model);
        let thread_tokens = Arc::clone(&tokens);
        let cfg = config.clone();
        let (done_tx, thread_done) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tokenfleet-engine".into())
            .spawn(move || {
                let _done = done_tx;
                let params = LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new(cfg.slots * cfg.ctx_per_slot))
                    .with_n_batch(cfg.batch_tokens)
                    .with_n_ubatch(cfg.batch_tokens)
                    .with_n_seq_max(cfg.slots)
                    // One KV stream per slot: a sequence's attention never touches another's
                    // cells, which keeps greedy output independent of what else is batched
                    // (tests/batching.rs checks batched == alone) and matches llama-server's
                    // layout with --parallel N.
                    .with_kv_unified(false)
                    .with_n_threads(cfg.threads as i32)
                    .with_n_threads_batch(cfg.threads as i32);
                let ctx = match thread_model.new_context(backend, params) {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = ready_tx.send(Err(EngineError::Context(e.to_string())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                Worker::new(
                    thread_tokens,
                    ctx,
                    cfg.slots,
                    cfg.batch_tokens,
                    command_rx,
                    stats_tx,
                )
                .run();
            })
            .map_err(|e| EngineError::Context(format!("cannot start the engine thread: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Shutdown)??;
        tracing::info!(model = %info.name, path = %config.model_path.display(), slots = config.slots,
            ctx_per_slot = config.ctx_per_slot, threads = config.threads, "engine ready");
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                tokens,
                commands,
                stats,
                template,
                info,
                max_waiting: config.max_waiting,
                thread: Some(thread),
                thread_done: std::sync::Mutex::new(thread_done),
            }),
        })
    }

    /// [`Engine::load`] on a blocking thread.
    pub async fn load_async(config: EngineConfig) -> Result<Self, EngineError> {
        tokio::task::spawn_blocking(move || Self::load(config))
            .await
            .map_err(|_| EngineError::Shutdown)?
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The model's token pieces and end-of-generation ids (what the worker releases text from).
    pub fn token_table(&self) -> Arc<TokenTable> {
        Arc::clone(&self.inner.tokens)
    }

    /// Text to token ids. `add_special` adds BOS where the model asks for it; special tokens
    /// written in the text (e.g. `<|im_start|>`) are parsed as such, as llama-server does.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<TokenId> {
        self.inner
            .model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Token ids to text (special tokens omitted).
    pub fn detokenize(&self, ids: &[TokenId]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.inner.tokens.piece(id).unwrap_or_default());
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The prompt tokens of a request: a conversation is rendered with the chat template, then
    /// tokenized with the model's special tokens; a plain prompt is tokenized; token ids pass
    /// through. The one definition agents generate from, the coordinator's verifier scores
    /// against and its edge counts with (two copies drifted apart would fail honest nodes).
    /// Blocking (a long prompt takes milliseconds): on an async executor use
    /// [`Engine::prompt_tokens_async`].
    pub fn prompt_tokens(&self, prompt: &PromptInput) -> Result<Vec<TokenId>, EngineError> {
        match prompt {
            PromptInput::Chat(messages) => Ok(self.tokenize(&self.render_chat(messages)?, true)),
            PromptInput::Text(text) => Ok(self.tokenize(text, true)),
            PromptInput::Tokens(ids) => Ok(ids.clone()),
        }
    }

    /// [`Engine::prompt_tokens`] on a blocking thread, off the async executor.
    pub async fn prompt_tokens_async(
        &self,
        prompt: PromptInput,
    ) -> Result<Vec<TokenId>, EngineError> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.prompt_tokens(&prompt))
            .await
            .map_err(|_| EngineError::Shutdown)?
    }

    /// Renders a conversation with the model's chat template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.inner
            .template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?
            .render(messages)
    }

    /// Validates and queues a generation. Tokens stream through the returned
    /// [`GenerationStream`]; dropping it cancels the generation and frees its slot before the
    /// next decode step.
    pub fn generate(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        self.validate(&request)?;
        let (events, rx) = mpsc::unbounded_channel();
        // Unbounded on purpose: the engine thread must never block on a slow consumer, and the
        // producer is bounded by the request's max_tokens (plus one final event).
        match self.inner.commands.try_send(Command::Generate {
            request,
            events,
            submitted: Instant::now(),
        }) {
            Ok(()) => Ok(GenerationStream { events: rx }),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(EngineError::Overloaded(self.inner.max_waiting as usize))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EngineError::Shutdown),
        }
    }

    fn validate(&self, r: &GenerationRequest) -> Result<(), EngineError> {
        if r.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        r.sampling.validate()?;
        if r.max_tokens == 0 {
            return Err(EngineError::InvalidSampling(
                "max_tokens must be at least 1".into(),
            ));
        }
        if r.top_logprobs > 20 {
            return Err(EngineError::InvalidSampling(
                "top_logprobs must be at most 20".into(),
            ));
        }
        let n_vocab = self.inner.info.n_vocab as i32;
        if let Some(&bad) = r
            .prompt
            .iter()
            .chain(&r.resume)
            .find(|&&t| t < 0 || t >= n_vocab)
        {
            return Err(EngineError::InvalidToken(bad));
        }
        let needed = r.prompt.len() + r.resume.len() + r.max_tokens as usize;
        let available = self.inner.info.ctx_per_slot;
        if needed > available as usize {
            return Err(EngineError::ContextOverflow {
                needed,
                prompt: r.prompt.len(),
                resumed: r.resume.len(),
                max_tokens: r.max_tokens,
                available,
            });
        }
        Ok(())
    }

    /// Teacher-forces `request.claimed` after `request.prompt` and scores every claimed token
    /// (see [`crate::score`]). Runs on the engine thread between decode steps, on a free
    /// sequence, so it waits while every slot is busy.
    pub async fn score(&self, request: ScoreRequest) -> Result<ScoreResult, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        request.sampling.validate()?;
        let n_vocab = self.inner.info.n_vocab as i32;
        if let Some(&bad) = request
            .prompt
            .iter()
            .chain(&request.claimed)
            .find(|&&t| t < 0 || t >= n_vocab)
        {
            return Err(EngineError::InvalidToken(bad));
        }
        let needed = request.prompt.len() + request.claimed.len();
        let available = self.inner.info.ctx_per_slot;
        if needed > available as usize {
            return Err(EngineError::ContextOverflow {
                needed,
                prompt: request.prompt.len(),
                resumed: request.claimed.len(),
                max_tokens: 0,
                available,
            });
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        match self
            .inner
            .commands
            .try_send(Command::Score { request, reply })
        {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(EngineError::Overloaded(self.inner.max_waiting as usize))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(EngineError::Shutdown),
        }
        rx.await
            .map_err(|_| EngineError::Shutdown)?
            .map_err(EngineError::Decode)
    }

    /// Changes the throttle (takes effect before the next decode step).
    pub fn set_limits(&self, limits: Limits) -> Result<(), EngineError> {
        self.inner
            .commands
            .try_send(Command::SetLimits(limits))
            .map_err(|_| EngineError::Overloaded(self.inner.max_waiting as usize))
    }

    /// The latest counters.
    pub fn stats(&self) -> EngineStats {
        self.inner.stats.borrow().clone()
    }

    /// A receiver that changes after every decode step.
    pub fn watch_stats(&self) -> watch::Receiver<EngineStats> {
        self.inner.stats.clone()
    }

    /// Waits (at most `timeout`) until no sequence is active or waiting; true when idle. Call
    /// it before the process exits: llama.cpp must not be mid-decode on the engine thread
    /// while the process tears its globals down.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let mut stats = self.inner.stats.clone();
        tokio::time::timeout(
            timeout,
            stats.wait_for(|s| s.slots_busy == 0 && s.queued == 0),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }
}

fn model_info(model: &LlamaModel, config: &EngineConfig) -> ModelInfo {
    let name = model
        .meta_val_str("general.name")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| file_stem(&config.model_path));
    ModelInfo {
        path: config.model_path.clone(),
        name,
        n_vocab: model.n_vocab().max(0) as u32,
        n_ctx_train: model.n_ctx_train(),
        slots: config.slots,
        ctx_per_slot: config.ctx_per_slot,
        has_chat_template: model.meta_val_str("tokenizer.chat_template").is_ok(),
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The events of one generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::UnboundedReceiver<GenerationEvent>,
}

impl GenerationStream {
    /// The next event; `None` after `Finished`/`Failed` (or if the engine stopped).
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// Blocking variant for threads outside the async runtime.
    pub fn blocking_next(&mut self) -> Option<GenerationEvent> {
        self.events.blocking_recv()
    }

    /// Runs the generation to the end and collects it.
    pub async fn collect(mut self) -> Result<Completion, EngineError> {
        let mut out = Completion::default();
        while let Some(ev) = self.next().await {
            match ev {
                GenerationEvent::Token(t) => {
                    out.text.push_str(&t.text);
                    out.tokens.push(t.id);
                    out.logprobs.push(t.logprob);
                }
                GenerationEvent::Finished(f) => {
                    out.text.push_str(&f.text_tail);
                    out.finished = Some(f);
                    return Ok(out);
                }
                GenerationEvent::Failed(m) => return Err(EngineError::Decode(m)),
            }
        }
        Err(EngineError::Shutdown)
    }
}

/// A whole generation, collected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<TokenId>,
    pub logprobs: Vec<f32>,
    pub finished: Option<crate::request::Finished>,
}

/// Reads every token's piece (special tokens omitted, as generated text shows them) and the
/// end-of-generation ids: about 50k short calls, a few milliseconds at load.
fn token_table(model: &LlamaModel) -> Arc<TokenTable> {
    let vocab = model.vocab();
    let n = model.n_vocab();
    let pieces = (0..n)
        .map(|t| {
            vocab
                .token_to_piece(LlamaToken(t), false, None)
                .into_boxed_slice()
        })
        .collect();
    let eog = (0..n).filter(|&t| vocab.is_eog(LlamaToken(t))).collect();
    TokenTable::new(pieces, eog)
}
