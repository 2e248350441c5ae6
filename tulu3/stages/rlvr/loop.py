"""The RLVR loop (``--stage rlvr``): generate, verify, pre-pass, advantages, PPO / GRPO updates.

One trainer step is one rollout batch: ``train.global_batch`` prompts (DP-sharded, each DP rank
its contiguous share, as every loop) x ``rlvr.samples_per_prompt`` samples (episodes), then
``rlvr.ppo_epochs`` passes over ``rlvr.mini_batches`` mini-batches, each one optimizer step of
the shared :func:`tulu3.step.train_step`. Per step:

1. generate with the policy's own chunks (tulu3/rollout/; sample keys are global sample
   positions, so the same seed samples the same tokens at every layout), in generation
   micro-batches of at most ``rlvr.generation_tokens`` KV-cache slots, pp of them in flight;
   with parallel.cp > 1 generation runs without CP, the CP ranks of a replica splitting its
   samples and all-gathering the responses (the pre-passes and updates then run with CP);
   a sample ends at eos, at a ``rlvr.stop_strings`` string, or at ``rlvr.max_new_tokens``;
2. verify: the first rank of each model-parallel group scores its replica's responses in a
   :class:`~tulu3.rewards.VerifierPool` and broadcasts them; a timeout or a crashed verifier
   scores 0 and is counted (``verifier_timeouts`` / ``verifier_errors``), never stops training;
   reward = ``rlvr_reward`` (correct_reward if verified, no_eos_penalty when it stopped on
   neither eos nor a stop string);
3. forward-only pre-passes, once per rollout batch: old log-probs and entropy (policy),
   reference log-probs (a frozen copy of the initial policy; skipped when kl_beta is 0) and,
   for PPO, values (the value model), broadcast from the last pipeline stage to the others;
4. advantages: PPO: per-token KL penalty (``rlvr.kl_estimator``, default kl1; GRPO's loss
   term defaults to kl3) + reward on the last token, GAE, whitening over the
   global batch; GRPO: group-normalized rewards on every response token;
5. updates: mini-batch m holds the prompts whose position p in the global batch has
   ``p % mini_batches == m`` with all their samples (the same sets at every DP size); the order
   of mini-batches is shuffled per epoch with a seeded RNG. PPO also updates the value model
   (its own megatron optimizer) on the same mini-batch.

Checkpoints hold the policy and, for PPO, the value model (``step_N/value/``: weights, optimizer,
LR schedule; :meth:`RLVRLoop.extra_models`), so a resumed run continues exactly where it stopped.
The frozen reference is not saved: it is rebuilt from ``model.load`` (see
:func:`~tulu3.stages.rlvr.models.build_reference`).

Run length: ``train.epochs`` over the prompts (drop-last), or with ``rlvr.total_episodes``
(open-instruct's) ``total_episodes // (global_batch x samples_per_prompt)`` steps, as many epochs
as that takes; ``train.max_steps`` caps either.

LR schedule: it steps once per rollout batch (``optim.warmup`` and the decay count rollout
batches); every optimizer step of one rollout batch uses the same LR.

Metrics: ``reward``, ``verified`` (the verifier's verdict, eos or not), ``no_eos`` (stopped on
neither eos nor a stop string),
``response_length`` (means over samples); ``kl`` (sum over the response of log pi_old -
log pi_ref, mean over samples: open-instruct's ``objective/kl``); ``entropy`` (per response
token, of the rollout policy); ``loss``, ``clip_fraction``, ``approx_kl``, ``ratio`` (means over
the update steps); PPO: ``value_loss``, ``explained_variance`` (of the rollout's values);
``gen_tokens_per_s`` (all replicas); wall-clock seconds of this rank's step, which add up to
it: ``time/generation_s`` (the ``generate`` call), ``time/scoring_s`` (everything else until
the rewards: decoding the responses, verification, building the rollout batch),
``time/training_s`` (pre-passes, advantages, the PPO / GRPO updates); ``verifier_timeouts``,
``verifier_errors`` (counts in the step).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tulu3.checkpoint.training import TrainedModel
from tulu3.config import Config, ConfigError
from tulu3.data.dataset import build_dataset
from tulu3.data.sampler import GlobalBatchSampler
from tulu3.metrics.profiling import TIMERS, phase
from tulu3.parallel.layout import ParallelLayout
from tulu3.rewards import VerifierPool, VerifyResult, rlvr_reward
from tulu3.rollout import PipelineComm, SamplingParams, generate
from tulu3.rollout.batch import RolloutBatch
from tulu3.rollout.kv_cache import attention_modules
from tulu3.rollout.stop import StopStrings
from tulu3.stages.forward import forward_pass
from tulu3.stages.logprobs import VocabShard
from tulu3.stages.rlvr.faults import check_verifier_failures
from tulu3.stages.rlvr.losses import (
    explained_variance,
    gae,
    group_advantages,
    kl_k1,
    masked_moments,
    ppo_rewards,
    whiten,
)
from tulu3.stages.rlvr.models import ValueModel, build_reference
from tulu3.stages.rlvr.settings import run_length, validate_rlvr
from tulu3.stages.rlvr.stage import RLVRPolicyStage, TokenLogprobs, TokenValues, ValueStage
from tulu3.step import train_step

log = logging.getLogger(__name__)

__all__ = ["RLVRLoop", "build_loop", "validate_rlvr"]

POLICY_KEYS = ("old_logprobs", "ref_logprobs", "advantages")
VALUE_KEYS = ("old_values", "returns")


class _HeldScheduler:
    """Stands in for the LR scheduler on all but the last optimizer step of a rollout batch."""

    def step(self, increment: int = 1) -> None:
        pass


class RLVRLoop:
    """Prompts -> rollouts -> rewards -> PPO / GRPO optimizer steps (see the module docstring)."""

    def __init__(self, cfg: Config, tokenizer: Any, chunks: list, trainer: Any,
                 shard: VocabShard, layout: ParallelLayout) -> None:
        # Also in preflight, but run_stage(cfg, "rlvr") called directly (tests, harnesses,
        # benchmarks) has no preflight: this is that path's only check. Microseconds.
        validate_rlvr(cfg, layout)
        self.cfg, self.rl, self.tok, self.chunks = cfg, cfg.rlvr, tokenizer, chunks
        self.trainer, self.layout, self.shard = trainer, layout, shard
        groups = trainer.groups
        self.dp_group, self.dp_rank, self.dp = groups.dp, groups.dp_rank, groups.dp_size
        self.pp_group, self.pp_last = groups.pp, groups.pp_last
        self.mp_group, self.scorer = groups.mp, groups.mp_first
        self.comm = PipelineComm.from_groups(groups)
        data = cfg.data
        common = dict(tok=tokenizer, max_len=data.max_len, add_bos=data.add_bos,
                      cache_dir=cfg.tokenization_cache,
                      seed=cfg.train.seed, skip_bad_rows=data.skip_bad_rows,
                      progress=self.dp_rank == 0)
        if data.train is None:
            raise ConfigError("data.train is not set (RLVR prompts with ground_truth)")
        self.dataset = build_dataset("rlvr", data.train, **common)
        self.eval_dataset = build_dataset("rlvr", data.eval, **common) if data.eval else None
        self.has_eval = self.eval_dataset is not None
        train = cfg.train
        self.steps, epochs = run_length(cfg, len(self.dataset))
        self.sampler = GlobalBatchSampler(len(self.dataset), train.global_batch, 1, self.dp_rank,
                                          self.dp, train.seed, epochs)
        self.kl_estimator = self.rl.kl_estimator or ("kl1" if self.rl.algo == "ppo" else "kl3")
        self.policy_stage = RLVRPolicyStage(shard, self.rl.algo, self.rl.clip, self.rl.kl_beta,
                                            cfg.model.fused_logprobs, self.rl.temperature,
                                            self.kl_estimator)
        self.stop = StopStrings(tokenizer.decode, self.rl.stop_strings)
        self.reference = (build_reference(cfg, chunks, layout, trainer.groups)
                          if self.rl.kl_beta > 0 else None)
        self.value = (ValueModel(cfg, layout, trainer.groups, self.total_steps())
                      if self.rl.algo == "ppo" else None)
        self.value_stage = ValueStage(self.rl.vf_coef, self.rl.value_clip)
        self.pool = (VerifierPool(self.rl.verifier_workers, self.rl.verifier_timeout_s)
                     if dist.get_rank() == self.scorer else None)
        if not attention_modules(chunks):
            log.warning(f"warning: model.spec={cfg.model.spec} has no KV cache hook: generation "
                        "recomputes the whole sequence at every step (slow); use "
                        "model.spec=torch for RLVR")

    def total_steps(self) -> int:
        steps = self.steps
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    # --- one rollout batch --------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        started = time.monotonic()
        indices = self.sampler.rank_indices(step).tolist()
        self.sampler.consumed_steps = step + 1
        prompts = [self.dataset[i] for i in indices]
        batch, outcome, gen_s = self._rollout(step, prompts)
        scored = time.monotonic()
        with phase("reference"):  # old / reference log-probs and values: forward-only
            self._prepass(batch)
        self._advantages(batch, outcome["reward"])
        updates = self._update(step, batch)
        done = time.monotonic()
        metrics = self._rollout_metrics(batch, outcome, gen_s)
        self._verify_fail_streak = check_verifier_failures(  # warns, or stops the run
            metrics["verifier_timeouts"] + metrics["verifier_errors"],
            self.cfg.train.global_batch * self.rl.samples_per_prompt, step + 1, self.rl,
            getattr(self, "_verify_fail_streak", 0))
        metrics.update(updates)
        metrics.update({"time/generation_s": gen_s,
                        "time/scoring_s": scored - started - gen_s,
                        "time/training_s": done - scored})
        return metrics

    def _rollout(self, step: int, prompts: list) -> tuple[RolloutBatch, dict, float]:
        rl, samples = self.rl, self.rl.samples_per_prompt
        share = self.cfg.train.global_batch // self.dp
        first = step * self.cfg.train.global_batch + self.dp_rank * share
        ids = [p.prompt_ids for p in prompts for _ in range(samples)]
        keys = [(first + j) * samples + k for j in range(len(prompts)) for k in range(samples)]
        params = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p, self.cfg.train.seed)
        started = time.monotonic()
        with phase("generation"):
            results = self._generate(ids, params, keys)
        gen_s = time.monotonic() - started
        items = [(prompts[i // samples].dataset, self._text(r),
                  prompts[i // samples].ground_truth) for i, r in enumerate(results)]
        with phase("verification"):
            verdict = self._score(items)
        # eos or a stop string: no no_eos_penalty (open-instruct: vLLM's finish_reason "stop")
        stopped = torch.tensor([r.stopped for r in results], dtype=torch.float64)
        reward = torch.tensor([rlvr_reward(VerifyResult(bool(c)), bool(e), rl.correct_reward,
                                           rl.no_eos_penalty)
                               for c, e in zip(verdict[:, 0], stopped, strict=True)])
        batch = RolloutBatch.build(ids, [r.tokens for r in results],
                                   [i // samples for i in range(len(results))], self._pad_id())
        outcome = {"reward": reward, "verified": verdict[:, 0], "timeouts": verdict[:, 1],
                   "errors": verdict[:, 2], "no_eos": 1.0 - stopped}
        return batch, outcome, gen_s

    def _rows_per_micro_batch(self) -> int:
        """An RLVR micro-batch is ``train.micro_batch`` prompts with all their samples."""
        return self.cfg.train.micro_batch * self.rl.samples_per_prompt

    def _generate(self, prompts: list, params: SamplingParams, keys: list[int] | None = None
                  ) -> list:
        return generate(self.chunks, prompts, params, self.shard.vocab, [self.tok.eos_id],
                        keys=keys, max_tokens=self.rl.generation_tokens,
                        stop=self.stop or None, comm=self.comm)

    def _text(self, result) -> str:
        """The response text the verifier sees: eos dropped, cut after a stop string."""
        text = self.tok.decode([t for t in result.tokens if t != self.tok.eos_id])
        return self.stop.truncate(text) if result.stopped and not result.has_eos else text

    def _pad_id(self) -> int:
        return self.tok.pad_id if self.tok.pad_id is not None else 0

    def _score(self, items: list[tuple[str, str, str]]) -> torch.Tensor:
        """[N, 3] (correct, timed out, errored) from this replica's scoring rank."""
        verdict = torch.zeros(len(items), 3, dtype=torch.float64)
        if self.pool is not None:
            for row, result in enumerate(self.pool.score(items)):
                verdict[row] = torch.tensor([result.correct, result.timed_out, result.errored],
                                            dtype=torch.float64)
        if dist.get_world_size(self.mp_group) > 1:
            dist.broadcast(verdict, src=self.scorer, group=self.mp_group)
        return verdict

    def _prepass(self, batch: RolloutBatch) -> None:
        """Old (and reference) log-probs, entropy and PPO's values for every row, on all ranks."""
        rows, size = list(range(len(batch))), self._rows_per_micro_batch()
        fused, temperature = self.cfg.model.fused_logprobs, self.rl.temperature
        passes = [(self.chunks, TokenLogprobs(self.shard, fused, True, temperature),
                   {"logprobs": "old_logprobs", "entropy": "entropy"})]
        if self.reference is not None:
            passes.append((self.reference, TokenLogprobs(self.shard, fused, False, temperature),
                           {"logprobs": "ref_logprobs"}))
        if self.value is not None:
            passes.append((self.value.chunks, TokenValues(), {"values": "old_values"}))
        for chunks, measure, names in passes:
            outputs = forward_pass(chunks, batch.micro_batches(rows, size), measure, self.layout)
            for captured, name in names.items():
                batch.put(name, outputs.get(captured, {}))
                if self.layout.pp > 1:
                    dist.broadcast(batch.per_token[name], src=self.pp_last, group=self.pp_group)
        if self.reference is None:
            batch.per_token["ref_logprobs"] = batch.per_token["old_logprobs"].clone()

    def _advantages(self, batch: RolloutBatch, reward: torch.Tensor) -> None:
        rl, mask = self.rl, batch.mask
        if rl.algo == "grpo":
            scores = group_advantages(reward, rl.samples_per_prompt)
            batch.per_token["advantages"] = scores[:, None] * mask
            return
        tokens = batch.per_token
        rewards = ppo_rewards(reward.float(), tokens["old_logprobs"], tokens["ref_logprobs"],
                              mask, rl.kl_beta, self.kl_estimator)
        advantages, returns = gae(rewards, tokens["old_values"], mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = whiten(advantages, mask, self.dp_group)
        tokens["advantages"], tokens["returns"] = advantages, returns

    def _update(self, step: int, batch: RolloutBatch) -> dict[str, float]:
        rl, size = self.rl, self._rows_per_micro_batch()
        minis = [[r for r in range(len(batch)) if int(batch.group[r]) % rl.mini_batches == m]
                 for m in range(rl.mini_batches)]
        rng = np.random.default_rng([self.cfg.train.seed, step])
        policy, value = [], []
        total = rl.ppo_epochs * rl.mini_batches
        for epoch in range(rl.ppo_epochs):
            for position, m in enumerate(rng.permutation(rl.mini_batches)):
                last = epoch * rl.mini_batches + position == total - 1
                scheduler = self.trainer.scheduler if last else _HeldScheduler()
                policy.append(train_step(self.chunks, self.trainer.optimizer, scheduler,
                                         batch.micro_batches(minis[m], size, POLICY_KEYS),
                                         self.policy_stage, self.layout, step,
                                         self.cfg.train.skip_nan))
                if self.value is not None:
                    v_scheduler = self.value.scheduler if last else _HeldScheduler()
                    with phase("value_update"), TIMERS.muted():  # not the policy's MFU time
                        value.append(train_step(self.value.chunks, self.value.optimizer,
                                                v_scheduler,
                                                batch.micro_batches(minis[m], size, VALUE_KEYS),
                                                self.value_stage, self.layout, step,
                                                self.cfg.train.skip_nan))
        out = {name: float(np.mean([r[name] for r in policy]))
               for name in ("loss", "clip_fraction", "approx_kl", "ratio", "grad_norm")}
        out.update(lr=policy[0]["lr"], skipped=any(r.get("skipped") for r in policy))
        if value:
            out["value_loss"] = float(np.mean([r["value_loss"] for r in value]))
            out["value_clip_fraction"] = float(np.mean([r["value_clip_fraction"]
                                                        for r in value]))
        return out

    def _rollout_metrics(self, batch: RolloutBatch, outcome: dict, gen_s: float
                         ) -> dict[str, float]:
        tokens, mask = batch.per_token, batch.mask
        kl = (kl_k1(tokens["old_logprobs"], tokens["ref_logprobs"]) * mask).sum(dim=1)
        lengths = batch.response_lengths()
        sums = torch.tensor([float(outcome["reward"].sum()), float(outcome["verified"].sum()),
                             float(outcome["no_eos"].sum()), float(lengths.sum()),
                             float(kl.sum()), float(outcome["timeouts"].sum()),
                             float(outcome["errors"].sum()), float(len(batch)),
                             float(batch.lengths.sum())], dtype=torch.float64)
        if self.dp > 1:
            dist.all_reduce(sums, group=self.dp_group)
        reward, verified, no_eos, length, kl_sum, timeouts, errors, n, seq_tokens = sums.tolist()
        entropy_mean, _, _ = masked_moments(tokens["entropy"], mask, self.dp_group)
        out = {"reward": reward / n, "verified": verified / n, "no_eos": no_eos / n,
               "response_length": length / n, "kl": kl_sum / n, "entropy": entropy_mean,
               "verifier_timeouts": int(timeouts), "verifier_errors": int(errors),
               "gen_tokens_per_s": length / max(gen_s, 1e-9), "tokens": int(seq_tokens),
               # the policy trains on every rollout token once per PPO epoch (MFU counts these)
               "trained_tokens": int(seq_tokens) * self.rl.ppo_epochs}
        if self.value is not None:
            out["explained_variance"] = explained_variance(tokens["old_values"],
                                                           tokens["returns"], mask,
                                                           self.dp_group)
        return out

    # --- evaluation and state -----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy generation on data.eval (each DP rank its share), verified fraction."""
        if self.eval_dataset is None:
            return {}
        mine = [self.eval_dataset[i] for i in range(self.dp_rank, len(self.eval_dataset),
                                                    self.dp)]
        params = SamplingParams(self.rl.max_new_tokens)
        results = self._generate([p.prompt_ids for p in mine], params)
        verdict = self._score([(p.dataset, self._text(r), p.ground_truth)
                               for p, r in zip(mine, results, strict=True)])
        sums = torch.tensor([float(verdict[:, 0].sum()),
                             float(sum(not r.stopped for r in results)), float(len(mine))],
                            dtype=torch.float64)
        if self.dp > 1:
            dist.all_reduce(sums, group=self.dp_group)
        verified, no_eos, n = sums.tolist()
        return {"verified": verified / max(n, 1), "no_eos": no_eos / max(n, 1)}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def extra_models(self) -> dict[str, TrainedModel]:
        """PPO's value model, checkpointed with the policy (GRPO: none; the reference is frozen
        and rebuilt from model.load)."""
        return {"value": self.value.trained()} if self.value is not None else {}

    def close(self) -> None:
        """Stop the verifier workers (the trainer calls it when fit returns or raises)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def build_loop(trainer: Any, tokenizer: Any, chunks: list, shard: VocabShard) -> RLVRLoop:
    return RLVRLoop(trainer.cfg, tokenizer, chunks, trainer, shard, trainer.layout)
