"""The in-training safety probe (`train.safety_probe`): every N optimizer steps, greedy answers
to K held-out harmful prompts, judged by the keyword judge with the breakdown of breakdown.py;
`probe_hrr`, `probe_refusal`, `probe_degenerate` go into the step's metrics row (metrics.jsonl,
MLflow). When HRR exceeds `stop_above` the trainer saves a checkpoint and stops with
trainer.TrainingStopped and the probe's message. A trainer.StepHook.

Generation is sharded over the ranks (every rank takes part: under ZeRO-3 each forward gathers
parameters collectively), and every rank gets the same verdicts, so all ranks stop together.
"""

from __future__ import annotations

from safebasin.safety_core.train.probe_config import SafetyProbeArgs


class SafetyProbe:
    def __init__(self, args: SafetyProbeArgs, tokenizer):
        from safebasin.safety_core.measure.judges import KeywordJudge
        from safebasin.safety_core.train.data import DataError, load_prompts
        self.args, self.tokenizer, self.judge = args, tokenizer, KeywordJudge()
        self.prompts = load_prompts(args.prompts, args.system_prompt)[:args.limit]
        if not self.prompts:
            raise DataError(f"train.safety_probe.prompts: {args.prompts.path} holds no prompt")

    def metrics(self, engine, step: int) -> dict[str, float]:
        """The probe's numbers at its steps, nothing at others."""
        return self.measure(engine.module) if step % self.args.every == 0 else {}

    def measure(self, model) -> dict[str, float]:
        """Generate, judge and summarise (the model is put in eval mode and back)."""
        from safebasin.safety_core.measure.generation import generate
        from safebasin.safety_core.measure.judges import summarize
        was_training = model.training
        model.eval()
        gens = generate(model, self.tokenizer, self.prompts, max_new_tokens=self.args.max_new_tokens,
                        batch_size=self.args.batch_size, progress=False)
        if was_training:
            model.train()
        responses = [g.response for g in gens]
        stats = summarize(self.judge.judge([g.prompt for g in gens], responses), responses)
        return {"probe_hrr": stats["hrr"], "probe_refusal": stats["refusal_rate"],
                "probe_degenerate": stats["degenerate_rate"]}

    def stop(self, row: dict, checkpoint_dir) -> str | None:
        """Why the job must stop after this step's row (None: it goes on)."""
        limit = self.args.stop_above
        if limit is None or row.get("probe_hrr") is None or row["probe_hrr"] <= limit:
            return None
        return (f"safety probe: HRR {row['probe_hrr']:.3f} on {len(self.prompts)} held-out harmful prompts "
                f"at step {row['step']} exceeds train.safety_probe.stop_above={self.args.stop_above} "
                f"(refusal {row['probe_refusal']:.3f}, degenerate {row['probe_degenerate']:.3f}); training "
                f"stopped, checkpoint saved under {checkpoint_dir}")
