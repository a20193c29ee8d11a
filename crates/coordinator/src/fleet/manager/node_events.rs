//! What nodes tell the manager: registration (`Hello`), token chunks, finished jobs and
//! evictions, and position updates that change a node's residency regions.

use tokenfleet_protocol::v1;
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokenfleet_scheduler::NodeId;

use super::{eviction_label, handback, NodeRefusal, Registered, State};
use crate::domain::error::RequestError;
use crate::domain::job::{JobOutcome, JobText, Placement};
use crate::domain::store::StoredToken;
use crate::fleet::nodes::{count_models, LastSeen, Node, NodeSender};

/// Longest text a node may send for one token (its own or an alternative's). A token's piece
/// is at most a few dozen bytes; the released text adds at most a held-back stop-string
/// prefix (stop strings are bounded at the edge).
const MAX_TOKEN_TEXT_BYTES: usize = 4096;

/// Vehicles that may report a job failed (JobFailed) before its client gets an error. Only
/// failures count: the first `bench trust` run counted every placement, and 10 of 1,000
/// requests failed after two hand-offs and one refusal by a vehicle that was just leaving.
const MAX_FAILURES: u32 = 3;

impl State {
    /// Drops a node's session, if it has one, and its models from the served-model counts.
    pub(super) fn close_session(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.sender.take().is_some() {
            count_models(
                &mut self.model_sessions,
                &self.models_tx,
                &node.hello,
                false,
            );
        }
    }

    pub(super) fn node_up(
        &mut self,
        hello: v1::Hello,
        attested: bool,
        sender: NodeSender,
        last_seen: LastSeen,
    ) -> Result<Registered, NodeRefusal> {
        if hello.node_id.is_empty() {
            return Err(NodeRefusal::EmptyNodeId);
        }
        self.refuse_quarantined(&hello.node_id)?;
        if hello.protocol_version != tokenfleet_protocol::PROTOCOL_VERSION {
            return Err(NodeRefusal::ProtocolVersion {
                offered: hello.protocol_version,
                spoken: tokenfleet_protocol::PROTOCOL_VERSION,
            });
        }
        let id = *self
            .node_names
            .entry(hello.node_id.clone())
            .or_insert_with(|| {
                let id = NodeId(self.next_node);
                self.next_node += 1;
                id
            });
        let conn = self.next_conn;
        self.next_conn += 1;
        let held = hello.held_jobs.clone();
        // Jobs leased to this node that its Hello does not hold: their Assign died with the
        // old connection, or they finished and their JobDone did too. The node is alive again
        // (its lease is refreshed), so nothing else would ever take them back.
        let stranded: Vec<u64> = self.nodes.get(&id).map_or_else(Vec::new, |n| {
            n.jobs
                .iter()
                .copied()
                .filter(|j| !held.iter().any(|h| h.job_id == j.to_string()))
                .collect()
        });
        let node = self
            .nodes
            .entry(id)
            .or_insert_with(|| Node::new(id, hello.clone()));
        let old = std::mem::replace(&mut node.hello, hello);
        if node.sender.is_some() {
            count_models(&mut self.model_sessions, &self.models_tx, &old, false);
        }
        count_models(&mut self.model_sessions, &self.models_tx, &node.hello, true);
        node.conn = conn;
        node.attested = attested;
        node.sender = Some(sender);
        node.last_seen = last_seen;
        tracing::debug!(node = %node.name, conn, held = held.len(), "node connected");
        let foreign: Vec<u64> = held
            .iter()
            .filter_map(|h| h.job_id.parse::<u64>().ok())
            .filter(|j| !self.jobs.contains_key(j))
            .collect();
        // Jobs the agent still runs: keep the ones still leased to it (it resends what we
        // lack), cancel the ones that moved on.
        for h in held {
            let job_id = h.job_id.parse::<u64>().ok();
            let job = job_id.and_then(|j| self.jobs.get(&j));
            let msg = match job {
                Some(job) if job.placement == (Placement::Running { node: id }) => {
                    CoordinatorMsg::Resend(v1::Resend {
                        job_id: h.job_id.clone(),
                        from_index: job.generated() as u32,
                    })
                }
                Some(job) if job.is_handing_back_from(id) => handback::hand_back_msg(job.id),
                _ => CoordinatorMsg::Cancel(v1::Cancel {
                    job_id: h.job_id.clone(),
                    reason: "job moved to another vehicle".into(),
                    hand_back: false,
                }),
            };
            if let Some(node) = self.nodes.get(&id) {
                node.send(msg);
            }
        }
        self.dirty_nodes.insert(id);
        self.wants_dispatch = true;
        self.node_gauges_dirty = true;
        Ok(Registered {
            node: id,
            conn,
            stranded,
            foreign,
        })
    }

    pub(super) async fn node_msg(&mut self, id: NodeId, conn: u64, msg: AgentMsg) {
        {
            let Some(node) = self.nodes.get_mut(&id) else {
                return;
            };
            if node.conn != conn {
                return; // a stale session of a node that has reconnected
            }
        }
        match msg {
            // Answered by the session task, which also keeps `last_seen`, attestation and
            // certificates.
            AgentMsg::Heartbeat(_) | AgentMsg::Quote(_) | AgentMsg::CertificateRequest(_) => {}
            AgentMsg::State(state) => {
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.state = state;
                }
                self.update_regions(id).await;
                self.node_gauges_dirty = true;
                self.dirty_nodes.insert(id);
                self.wants_dispatch = true;
            }
            AgentMsg::Hello(_) => {
                tracing::warn!(node = %self.node_name(id), "second Hello on one session ignored");
            }
            AgentMsg::Chunk(chunk) => self.on_chunk(id, chunk).await,
            AgentMsg::Done(done) => self.on_done(id, done).await,
            AgentMsg::Evicted(ev) => {
                let Some(job) = self.running_on(&ev.job_id, id) else {
                    return;
                };
                // A hand-back was counted when the preemption was decided.
                if !self
                    .jobs
                    .get(&job)
                    .is_some_and(|j| j.is_handing_back_from(id))
                {
                    self.metrics
                        .evictions
                        .with_label_values(&[eviction_label(&ev.reason)])
                        .inc();
                }
                tracing::info!(node = %self.node_name(id), job, reason = %ev.reason, next_index = ev.next_index, "job evicted; requeued");
                self.requeue(job, id).await;
            }
            AgentMsg::Failed(f) => {
                let Some(job) = self.running_on(&f.job_id, id) else {
                    return;
                };
                let failures = self.jobs.get_mut(&job).map_or(0, |j| {
                    j.failures += 1;
                    j.failures
                });
                // The node's text goes to the operator's log only: a client never reads what a
                // vehicle wrote (it could be anything), and "permanent" is the node's claim,
                // so the job gets other vehicles before it fails.
                let reason = if f.retryable {
                    "retryable"
                } else {
                    "permanent"
                };
                let cause: String = f.message.chars().take(512).collect();
                tracing::warn!(node = %self.node_name(id), job, retryable = f.retryable, %cause, "job failed on node");
                self.metrics
                    .node_job_failures
                    .with_label_values(&[reason])
                    .inc();
                if failures < MAX_FAILURES {
                    self.requeue(job, id).await;
                } else {
                    self.detach(job, id);
                    let err = RequestError::unavailable(format!(
                        "the fleet could not complete this request ({failures} vehicles failed it); retry later"
                    ));
                    self.end(job, JobOutcome::Failed(err)).await;
                }
            }
        }
    }

    /// The job id if `job_id` names a job currently running on `node` (or being handed back
    /// by it).
    pub(super) fn running_on(&self, job_id: &str, node: NodeId) -> Option<u64> {
        let id = job_id.parse::<u64>().ok()?;
        let job = self.jobs.get(&id)?;
        (job.placement == Placement::Running { node } || job.is_handing_back_from(node))
            .then_some(id)
    }

    /// Folds a node's token chunk into its job. What a node may send is bounded by the job
    /// (never more than `max_tokens`, alternatives only as many as asked for, each text
    /// short); where the coordinator holds the model's token table, the text every client
    /// sees is released here from the token ids, and a node whose texts differ is reported
    /// as forging output.
    pub(super) async fn on_chunk(&mut self, node: NodeId, chunk: v1::TokenChunk) {
        let n = chunk.token_ids.len();
        self.metrics.tokens_generated.inc_by(n as u64);
        let Some(id) = self.running_on(&chunk.job_id, node) else {
            return;
        };
        let node_name = self.node_name(node).to_string();
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let top_wanted = if job.request.logprobs {
            job.request.top_logprobs as usize
        } else {
            0
        };
        if let Some(why) = malformed(&chunk, top_wanted) {
            tracing::warn!(node = %node_name, job = id, %why, "malformed chunk ignored");
            return;
        }
        let have = job.generated();
        let start = chunk.start_index as usize;
        if start > have {
            tracing::warn!(node = %node_name, job = id, start, have, "chunk leaves a gap; ignored");
            return;
        }
        let skip = have - start;
        if skip >= n {
            return; // all already known (a resend)
        }
        // Never more tokens than the request allows (a node could otherwise grow a job, its
        // stored output and every client's stream without bound).
        let room = (job.request.max_tokens as usize).saturating_sub(have);
        let mut take = (n - skip).min(room);
        let mut forged = (n - skip > room).then(|| {
            format!(
                "sent tokens past max_tokens {} (had {have}, sent {})",
                job.request.max_tokens,
                n - skip
            )
        });
        // The coordinator's own text for each new token.
        let mut texts = Vec::with_capacity(take);
        let mut tops = Vec::with_capacity(take);
        for i in skip..skip + take {
            let tid = chunk.token_ids[i];
            let top = alternatives(job.text.as_ref(), chunk.top_logprobs.get(i));
            let text = match job.text.as_mut() {
                None => chunk.texts[i].clone(),
                Some(jt) => match jt.push(tid) {
                    Ok(text) => {
                        if text != chunk.texts[i] && forged.is_none() {
                            forged = Some(format!(
                                "the text sent for token {} is not the detokenization of its id {tid}",
                                start + i
                            ));
                        }
                        text
                    }
                    Err(why) => {
                        forged.get_or_insert(why);
                        take = i - skip;
                        break;
                    }
                },
            };
            texts.push(text);
            tops.push(top);
        }
        if take > 0 && job.producers.last().map(|p| p.0) != Some(node) {
            job.producers.push((node, have));
        }
        let mut delivered = 0;
        job.view.send_modify(|v| {
            v.prompt_tokens = chunk.prompt_tokens;
            for ((k, text), top) in texts.into_iter().enumerate().zip(tops) {
                let i = skip + k;
                v.tokens.push(StoredToken {
                    id: chunk.token_ids[i],
                    text,
                    logprob: chunk.logprobs[i],
                    top,
                });
                delivered += 1;
            }
        });
        self.metrics.tokens_delivered.inc_by(delivered);
        if delivered > 0 && !job.first_token_seen {
            job.first_token_seen = true;
            self.metrics
                .ttft
                .observe(job.accepted.elapsed().as_secs_f64());
        }
        if let Some(why) = forged {
            self.forged_output(node, id, why).await;
        }
    }

    pub(super) async fn on_done(&mut self, node: NodeId, done: v1::JobDone) {
        let Some(id) = self.running_on(&done.job_id, node) else {
            return;
        };
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let have = job.generated() as u32;
        if done.next_index != have {
            // Some chunks were lost (a reconnect); the tokens we lack are regenerated.
            tracing::warn!(node = %self.node_name(node), job = id, have, reported = done.next_index, "JobDone before all chunks arrived; resuming elsewhere");
            self.requeue(id, node).await;
            return;
        }
        let claimed =
            v1::FinishReason::try_from(done.finish_reason).unwrap_or(v1::FinishReason::Stop);
        let max_tokens = job.request.max_tokens;
        let stopped_by_string = job.text.as_ref().is_some_and(JobText::stopped);
        let our_tail = job.text.as_ref().map(JobText::tail);
        // Is the claimed end consistent with the tokens? `length`: exactly max_tokens and no
        // stop string; `stop`: a stop string completed in the coordinator's own release, or
        // the node claims the model ended (an end-of-generation token; the verifier checks
        // that), which cannot come after max_tokens.
        let inconsistent = match claimed {
            v1::FinishReason::Length if have < max_tokens || stopped_by_string => Some(format!(
                "claimed finish_reason length after {have} of max_tokens {max_tokens}{}",
                if stopped_by_string {
                    " and a stop string"
                } else {
                    ""
                }
            )),
            v1::FinishReason::Length => None,
            _ if have >= max_tokens && !stopped_by_string => Some(format!(
                "claimed the model ended after max_tokens {max_tokens} were generated"
            )),
            _ => None,
        }
        .or_else(|| {
            our_tail
                .as_ref()
                .is_some_and(|t| *t != done.text_tail)
                .then(|| "the text tail sent is not the held-back text of its tokens".into())
        });
        if let Some(why) = inconsistent {
            // The job is not finished (or its end is forged): it continues elsewhere from the
            // tokens the coordinator holds, and the node is reported.
            self.detach(id, node);
            self.forged_output(node, id, why).await;
            self.requeue_if_live(id, node).await;
            return;
        }
        let finish_reason = match claimed {
            v1::FinishReason::Length => "length",
            _ => "stop",
        };
        let text_tail = our_tail.unwrap_or(done.text_tail);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        // The node that ends a job claims its end, even with no token of its own (a job that
        // produced nothing is verified too).
        if job.producers.last().map(|p| p.0) != Some(node) {
            job.producers.push((node, have as usize));
        }
        self.detach(id, node);
        self.metrics.record_job_energy(
            done.grid_energy_j,
            done.battery_energy_j,
            done.energy_measured,
            done.battery_wear_usd,
        );
        tracing::debug!(node = %self.node_name(node), job = id, energy_j = done.energy_j, measured = done.energy_measured, wear_usd = done.battery_wear_usd, "job done");
        let prompt_tokens = done.prompt_tokens;
        self.end(
            id,
            JobOutcome::Done {
                finish_reason: finish_reason.into(),
                text_tail,
                prompt_tokens,
            },
        )
        .await;
    }

    /// Recomputes a node's residency regions from its reported position; jobs whose residency
    /// it no longer satisfies (it crossed a border, or lost its position fix) are taken back
    /// and continue elsewhere from their acknowledged tokens.
    pub(super) async fn update_regions(&mut self, id: NodeId) {
        if self.regions.is_empty() {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let regions = match (node.state.latitude, node.state.longitude) {
            (Some(lat), Some(lon)) => self.regions.regions_at(lat, lon),
            _ => Vec::new(),
        };
        if regions == node.regions {
            return;
        }
        tracing::info!(node = %node.name, from = ?node.regions, to = ?regions, "node changed residency regions");
        node.regions = regions;
        self.dirty_nodes.insert(id);
        let outside: Vec<u64> =
            node.jobs
                .iter()
                .copied()
                .filter(|j| {
                    self.jobs.get(j).is_some_and(|job| {
                        job.request.residency.as_ref().is_some_and(|allowed| {
                            !allowed.iter().any(|r| node.regions.contains(r))
                        })
                    })
                })
                .collect();
        for job in outside {
            if let Some(node) = self.nodes.get(&id) {
                node.send(CoordinatorMsg::Cancel(v1::Cancel {
                    job_id: job.to_string(),
                    reason: "vehicle left the job's residency region".into(),
                    // Continued from the tokens the coordinator already holds.
                    hand_back: false,
                }));
            }
            self.metrics
                .evictions
                .with_label_values(&["residency"])
                .inc();
            tracing::info!(node = %self.node_name(id), job, "job taken back: vehicle left its residency region");
            self.requeue(job, id).await;
        }
    }
}

/// Why a chunk's shape is unacceptable, if it is: per-token fields that do not line up with
/// the token ids, more alternatives than asked for, an oversized text.
fn malformed(chunk: &v1::TokenChunk, top_wanted: usize) -> Option<String> {
    let n = chunk.token_ids.len();
    let texts = chunk.texts.iter().chain(
        chunk
            .top_logprobs
            .iter()
            .flat_map(|t| t.top.iter().map(|a| &a.text)),
    );
    if chunk.texts.len() != n || chunk.logprobs.len() != n {
        Some("texts or logprobs do not match the token ids".to_string())
    } else if !(chunk.top_logprobs.is_empty() || chunk.top_logprobs.len() == n) {
        Some("top_logprobs do not match the token ids".to_string())
    } else if chunk.top_logprobs.iter().any(|t| t.top.len() > top_wanted) {
        Some(format!("more than the {top_wanted} alternatives asked for"))
    } else if texts.into_iter().any(|t| t.len() > MAX_TOKEN_TEXT_BYTES) {
        Some(format!(
            "a token text longer than {MAX_TOKEN_TEXT_BYTES} bytes"
        ))
    } else {
        None
    }
}

/// A token's alternatives as the client sees them: with the model's token table, each text
/// is the coordinator's own detokenization of the alternative's id, not the node's claim.
fn alternatives(text: Option<&JobText>, top: Option<&v1::TokenLogprobs>) -> Vec<(String, f32)> {
    let Some(top) = top else {
        return Vec::new();
    };
    top.top
        .iter()
        .map(|a| {
            let released =
                text.map_or_else(|| Some(a.text.clone()), |jt| jt.token_text(a.token_id));
            (released.unwrap_or_default(), a.logprob)
        })
        .collect()
}
