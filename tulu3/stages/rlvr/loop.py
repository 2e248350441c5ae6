"""The RLVR loop (``--stage rlvr``): generate, verify, pre-pass, advantages, PPO / GRPO updates.

One trainer step is one rollout batch: ``train.global_batch`` prompts (DP-sharded, each DP rank
its contiguous share, as every loop) x ``rlvr.samples_per_prompt`` samples, then
``rlvr.ppo_epochs`` passes over ``rlvr.mini_batches`` mini-batches, each one optimizer step of
the shared :func:`tulu3.step.train_step`. Per step:

1. generate with the policy's own chunks (tulu3/rollout/; sample keys are global sample
   positions, so the same seed samples the same tokens at every layout);
2. verify: the first rank of each model-parallel group scores its replica's responses in a
   :class:`~tulu3.rewards.VerifierPool` and broadcasts them; a timeout or a crashed verifier
   scores 0 and is counted (``verifier_timeouts`` / ``verifier_errors``), never stops training;
   reward = ``rlvr_reward`` (correct_reward if verified, no_eos_penalty when no eos);
3. forward-only pre-passes, once per rollout batch: old log-probs and entropy (policy),
   reference log-probs (a frozen copy of the initial policy; skipped when kl_beta is 0) and,
   for PPO, values (the value model), broadcast from the last pipeline stage to the others;
4. advantages: PPO: per-token KL penalty + reward on the last token, GAE, whitening over the
   global batch; GRPO: group-normalized rewards on every response token;
5. updates: mini-batch m holds the prompts whose position p in the global batch has
   ``p % mini_batches == m`` with all their samples (the same sets at every DP size); the order
   of mini-batches is shuffled per epoch with a seeded RNG. PPO also updates the value model
   (its own megatron optimizer) on the same mini-batch.

Checkpoints hold the policy and, for PPO, the value model (``step_N/value/``: weights, optimizer,
LR schedule; :meth:`RLVRLoop.extra_models`), so a resumed run continues exactly where it stopped.
The frozen reference is not saved: it is rebuilt from ``model.load`` (see
:func:`~tulu3.stages.rlvr.models.build_reference`).

LR schedule: it steps once per rollout batch (``optim.warmup`` and the decay count rollout
batches); every optimizer step of one rollout batch uses the same LR.

Metrics: ``reward``, ``verified`` (the verifier's verdict, eos or not), ``no_eos``,
``response_length`` (means over samples); ``kl`` (sum over the response of log pi_old -
log pi_ref, mean over samples: open-instruct's ``objective/kl``); ``entropy`` (per response
token, of the rollout policy); ``loss``, ``clip_fraction``, ``approx_kl``, ``ratio`` (means over
the update steps); PPO: ``value_loss``, ``explained_variance`` (of the rollout's values);
``gen_tokens_per_s`` (all replicas), ``time/generation_s``, ``time/scoring_s``,
``time/training_s``; ``verifier_timeouts``, ``verifier_errors`` (counts in the step).
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
from tulu3.parallel.layout import ParallelLayout
from tulu3.rewards import VerifierPool, VerifyResult, rlvr_reward
from tulu3.rollout import PipelineComm, SamplingParams, generate
from tulu3.rollout.batch import RolloutBatch
from tulu3.rollout.kv_cache import attention_modules
from tulu3.stages.forward import forward_pass
from tulu3.stages.logprobs import VocabShard
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
from tulu3.stages.rlvr.stage import RLVRPolicyStage, TokenLogprobs, TokenValues, ValueStage
from tulu3.step import train_step

log = logging.getLogger(__name__)

POLICY_KEYS = ("old_logprobs", "ref_logprobs", "advantages")
VALUE_KEYS = ("old_values", "returns")


class _HeldScheduler:
    """Stands in for the LR scheduler on all but the last optimizer step of a rollout batch."""

    def step(self, increment: int = 1) -> None:
        pass


def validate_rlvr(cfg: Config, layout: ParallelLayout) -> None:
    """Raise ConfigError for RLVR settings that cannot run (before anything is built)."""
    rl, train = cfg.rlvr, cfg.train
    if rl.rollout_backend != "inprocess":
        raise ConfigError("rlvr.rollout_backend=vllm is not implemented in this build: "
                          "use rlvr.rollout_backend=inprocess (generation on the trainer's own "
                          "weights)")
    if rl.algo == "grpo" and rl.samples_per_prompt < 2:
        raise ConfigError("rlvr.algo=grpo needs rlvr.samples_per_prompt >= 2 (it normalizes "
                          "rewards within each prompt's group)")
    if train.global_batch % layout.dp:
        raise ConfigError(f"train.global_batch={train.global_batch} prompts do not split over "
                          f"{layout.dp} data-parallel ranks")
    share = train.global_batch // layout.dp
    if share % rl.mini_batches:
        raise ConfigError(f"{share} prompts per DP rank do not split into rlvr.mini_batches="
                          f"{rl.mini_batches}")
    prompts = share // rl.mini_batches
    if prompts % train.micro_batch:
        raise ConfigError(f"a mini-batch has {prompts} prompts per DP rank, not a multiple of "
                          f"train.micro_batch={train.micro_batch} (an RLVR micro-batch is "
                          "train.micro_batch prompts with all their samples)")
    micro_batches = prompts // train.micro_batch
    if layout.vpp > 1 and micro_batches % layout.pp:
        raise ConfigError(f"interleaved pipelining needs micro-batches per mini-batch "
                          f"({micro_batches}) to be a multiple of parallel.pp")
    if layout.vpp > 1 and micro_batches == layout.pp and not torch.cuda.is_available():
        # As make_layout: megatron's all-warm-up interleaved path deadlocks on gloo.
        raise ConfigError(f"interleaved pipelining on CPU/gloo needs more micro-batches per "
                          f"mini-batch ({micro_batches}) than parallel.pp={layout.pp}")


class RLVRLoop:
    """Prompts -> rollouts -> rewards -> PPO / GRPO optimizer steps (see the module docstring)."""

    def __init__(self, cfg: Config, tokenizer: Any, chunks: list, trainer: Any,
                 shard: VocabShard, layout: ParallelLayout) -> None:
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
                      cache_dir=data.cache_dir or f"{cfg.train.run_dir}/../.cache/tokenized",
                      seed=cfg.train.seed, skip_bad_rows=data.skip_bad_rows,
                      progress=self.dp_rank == 0)
        if data.train is None:
            raise ConfigError("data.train is not set (RLVR prompts with ground_truth)")
        self.dataset = build_dataset("rlvr", data.train, **common)
        self.eval_dataset = build_dataset("rlvr", data.eval, **common) if data.eval else None
        self.has_eval = self.eval_dataset is not None
        train = cfg.train
        self.sampler = GlobalBatchSampler(len(self.dataset), train.global_batch, 1, self.dp_rank,
                                          self.dp, train.seed, train.epochs)
        self.policy_stage = RLVRPolicyStage(shard, self.rl.algo, self.rl.clip, self.rl.kl_beta,
                                            cfg.model.fused_logprobs, self.rl.temperature)
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
        steps = len(self.sampler)
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    # --- one rollout batch --------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        started = time.monotonic()
        indices = self.sampler.rank_indices(step).tolist()
        self.sampler.consumed_steps = step + 1
        prompts = [self.dataset[i] for i in indices]
        batch, outcome, gen_s = self._rollout(step, prompts)
        scored = time.monotonic()
        self._prepass(batch)
        self._advantages(batch, outcome["reward"])
        updates = self._update(step, batch)
        done = time.monotonic()
        metrics = self._rollout_metrics(batch, outcome, gen_s)
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
        results = generate(self.chunks, ids, params, self.shard.vocab, [self.tok.eos_id],
                           keys=keys, comm=self.comm)
        gen_s = time.monotonic() - started
        items = [(prompts[i // samples].dataset, self._text(r.tokens),
                  prompts[i // samples].ground_truth) for i, r in enumerate(results)]
        verdict = self._score(items)
        has_eos = torch.tensor([r.has_eos for r in results], dtype=torch.float64)
        reward = torch.tensor([rlvr_reward(VerifyResult(bool(c)), bool(e), rl.correct_reward,
                                           rl.no_eos_penalty)
                               for c, e in zip(verdict[:, 0], has_eos, strict=True)])
        batch = RolloutBatch.build(ids, [r.tokens for r in results],
                                   [i // samples for i in range(len(results))], self._pad_id())
        outcome = {"reward": reward, "verified": verdict[:, 0], "timeouts": verdict[:, 1],
                   "errors": verdict[:, 2], "no_eos": 1.0 - has_eos}
        return batch, outcome, gen_s

    def _rows_per_micro_batch(self) -> int:
        """An RLVR micro-batch is ``train.micro_batch`` prompts with all their samples."""
        return self.cfg.train.micro_batch * self.rl.samples_per_prompt

    def _text(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if t != self.tok.eos_id])

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
                              mask, rl.kl_beta)
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
                    value.append(train_step(self.value.chunks, self.value.optimizer, v_scheduler,
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
               "gen_tokens_per_s": length / max(gen_s, 1e-9), "tokens": int(seq_tokens)}
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
        results = generate(self.chunks, [p.prompt_ids for p in mine], params, self.shard.vocab,
                           [self.tok.eos_id], comm=self.comm)
        verdict = self._score([(p.dataset, self._text(r.tokens), p.ground_truth)
                               for p, r in zip(mine, results, strict=True)])
        sums = torch.tensor([float(verdict[:, 0].sum()),
                             float(sum(not r.has_eos for r in results)), float(len(mine))],
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
