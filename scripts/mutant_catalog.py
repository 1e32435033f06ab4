"""The named mutants of `make mutants`: small, plausible bugs the test suite must catch.

Each mutant is one change to one line of the package (``old`` -> ``new``; ``old`` may carry a
line of context on each side so that it matches exactly once) and the tests that should catch
it, cheapest first. `scripts/mutants.py` applies each to a scratch copy of the checkout and runs
those tests there; a mutant is *killed* when they fail.

When a feature lands, add the bugs it could plausibly have here (the README's
Testing section). When code moves, update ``old``: the runner refuses a mutant whose ``old`` no
longer matches exactly once, so a stale entry cannot pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str               # relative to the checkout
    old: str                # the exact text replaced (must occur exactly once)
    new: str
    tests: Tuple[str, ...]  # pytest arguments (node ids or files), run from the checkout
    why: str = ""           # what a user would see if this bug shipped


def _traj(scenario: str, np: int = 2) -> str:
    return f"tests/test_trajectories.py::test_trajectory_matches_float64_simulation[{scenario}-{np}]"


def _stream(scenario: str, np: int = 2) -> str:
    return f"tests/test_streaming.py::test_streaming_matches_float64_reference[{scenario}-{np}]"


def _hetero(which: int, np: int = 3) -> str:
    """Algorithm 3 scenario ``which`` of test_trajectories.HETEROGENEOUS[np]."""
    return f"tests/test_trajectories.py::test_heterogeneous_trajectory_matches_float64_simulation[{which}-{np}]"


MUTANTS = [
    # ---- Algorithm 1 and the schedules --------------------------------------------------------
    Mutant("average_after_instead_of_before_update", "prsgd_hvd/schedules.py",
           "return AVERAGE_BEFORE if t % self.interval == 0 else NO_ACTION",
           "return StepPlan(average_after=True) if t % self.interval == 0 else NO_ACTION",
           (_traj("sgd_plain_i3"),),
           "the gradient of an averaging step would be taken at the average, not locally"),
    Mutant("interval_off_by_one", "prsgd_hvd/schedules.py",
           "return AVERAGE_BEFORE if t % self.interval == 0 else NO_ACTION",
           "return AVERAGE_BEFORE if (t + 1) % self.interval == 0 else NO_ACTION",
           (_traj("sgd_plain_i3"),)),
    Mutant("warmup_one_step_short", "prsgd_hvd/schedules.py",
           "return WARMUP_ROUND if t <= self.steps else self.inner.plan(t, elapsed)",
           "return WARMUP_ROUND if t < self.steps else self.inner.plan(t, elapsed)",
           (_traj("sgd_warmup4_i3"),)),
    Mutant("time_varying_lr_never_set", "prsgd_hvd/local_sgd.py",
           "        if plan.lr is not None:\n            for group in self.opt.param_groups:",
           "        if plan.lr is None:\n            for group in self.opt.param_groups:",
           (_traj("time_varying_lists_with_lrs"),)),
    Mutant("heterogeneous_uses_rank0_interval", "prsgd_hvd/schedules.py",
           "return self._plan(t, self.in_epoch(t) >= self.intervals[self.rank])",
           "return self._plan(t, self.in_epoch(t) >= self.intervals[0])",
           (_hetero(0),)),
    Mutant("hierarchical_smallest_period_wins", "prsgd_hvd/schedules.py",
           "for period, group in reversed(self.levels):",
           "for period, group in self.levels:",
           ("tests/test_trajectories.py::test_grouped_averaging_matches_float64_simulation",)),
    # ---- what a round averages and how -------------------------------------------------------
    Mutant("weight_divisor_is_rank_count", "prsgd_hvd/averaging.py",
           'self.weight_sum = sum(self._field("weight"))',
           'self.weight_sum = float(len(self.records))',
           (_hetero(1),),
           "weighted (Algorithm 3 'steps') averages divided by N instead of the sum of weights"),
    Mutant("momentum_averaged_by_default", "prsgd_hvd/round_contents.py",
           "        if self.average_state:\n            out += self.agree_on_state_entries",
           "        if True:\n            out += self.agree_on_state_entries",
           (_traj("sgd_momentum_i4"),)),
    Mutant("model_buffers_not_averaged", "prsgd_hvd/round_contents.py",
           "        if self.model is None:\n            return []",
           "        if True:\n            return []",
           ("tests/test_optimizer_unit.py::test_model_buffers_and_optimizer_state_are_included_when_asked",)),
    Mutant("state_and_buffers_summed_not_averaged", "prsgd_hvd/averaging.py",
           "                kernels.unflatten_average_(b.segment(n, len(b.tensors)), b.tensors[n:],\n"
           "                                           scale=self.scale, align=ALIGN)",
           "                kernels.unflatten_average_(b.segment(n, len(b.tensors)), b.tensors[n:],\n"
           "                                           scale=1.0, align=ALIGN)",
           ("tests/test_robustness.py",),
           "average_state=True / model= buffers would hold the sum over ranks"),
    Mutant("write_back_skips_last_bucket", "prsgd_hvd/averaging.py",
           "for b, n in zip(self.buckets, self.layout.leading(measured)):",
           "for b, n in zip(self.buckets[:-1] or self.buckets, self.layout.leading(measured)):",
           ("tests/test_trajectories.py::test_mixed_dtypes_match_float64_simulation",),
           "with several dtypes, one dtype's parameters would never be averaged"),
    Mutant("fused_step_skips_last_bucket", "prsgd_hvd/fused_sgd.py",
           "for b, runs in zip(rnd.buckets, self.runs(rnd.layout)):",
           "for b, runs in zip(rnd.buckets[:-1] or rnd.buckets, self.runs(rnd.layout)):",
           ("tests/test_trajectories.py::test_mixed_dtypes_match_float64_simulation",)),
    Mutant("low_precision_summed_in_its_own_dtype", "prsgd_hvd/averaging.py",
           "return torch.float32 if dtype in _LOW_PRECISION else dtype",
           "return dtype",
           ("tests/test_averaging_unit.py", "tests/test_trajectories.py")),
    # ---- the fused average+SGD pass ---------------------------------------------------------
    Mutant("fused_sgd_drops_nesterov", "prsgd_hvd/fused_sgd.py",
           'nesterov=bool(group["nesterov"])', "nesterov=False",
           (_traj("sgd_nesterov_dampening_i2"),)),
    Mutant("fused_sgd_drops_weight_decay", "prsgd_hvd/fused_sgd.py",
           'weight_decay=float(group["weight_decay"])', "weight_decay=0.0",
           (_traj("sgd_momentum_i4"),)),
    Mutant("fused_sgd_first_step_not_initialised", "prsgd_hvd/fused_sgd.py",
           "                    first = True", "                    first = False",
           (_traj("sgd_momentum_i4"),)),
    Mutant("fused_step_reads_unaveraged_momentum", "prsgd_hvd/fused_sgd.py",
           "self._runs.append(sorted(runs, key=lambda run: run[0] is not None))",
           "self._runs.append(runs)",
           ("tests/test_robustness.py::test_average_state_averages_the_state_every_rank_has",),
           "average_state=True with fused SGD: the step would use this rank's own momentum"),
    Mutant("overlap_prestarts_model_buffers", "prsgd_hvd/overlap.py",
           "            self.on = e.config.overlap and e.world.size > 1 and \\\n",
           "            self.on = e.config.overlap and e.world.size > 1 or \\\n",
           ("tests/test_robustness.py::test_model_buffers_are_averaged_across_ranks",),
           "BatchNorm statistics of the averaging step's forward pass would be overwritten"),
    # ---- 16-bit deltas ----------------------------------------------------------------------
    Mutant("error_feedback_dropped_in_wiring", "prsgd_hvd/world.py",
           "wire_format_for(self.config.compression, self.config.error_feedback)",
           "wire_format_for(self.config.compression, False)",
           ("tests/test_trajectories.py",)),
    Mutant("codec_anchor_not_updated", "prsgd_hvd/anchor.py",
           "                torch.mul(b.payload, rnd.scale, out=flat)\n",
           "                flat.add_(0)\n",
           ("tests/test_trajectories.py::test_mixed_dtypes_match_float64_simulation",),
           "only the rounding changes (the anchor cancels out of the average): caught where the "
           "reference models the 16-bit wire exactly"),
    Mutant("codec_decode_divides_by_rank_count", "prsgd_hvd/wire_formats.py",
           "anchor.bucket(bucket.index), alpha=weight_sum,", "anchor.bucket(bucket.index), alpha=size,",
           ("tests/test_trajectories.py",)),
    # ---- identity, overlap, faults, endings --------------------------------------------------
    Mutant("control_record_of_wrong_round_accepted", "prsgd_hvd/averaging.py",
           "if len(set(numbers)) > 1 or len(training) > 1:",
           "if len(training) > 1:",
           ("tests/test_averaging_unit.py::test_identity_checks",
            "tests/test_misuse.py::test_resume_on_rank_0_only_is_caught_at_the_next_round")),
    Mutant("overlap_prestarts_epoch_end_rounds", "prsgd_hvd/overlap.py",
           "        if not plan.average_before:\n            return\n        e.round_stage.prestart(",
           "        if not plan.averages:\n            return\n        e.round_stage.prestart(",
           ("tests/test_trajectories.py",),
           "Algorithms 2-3 average x^t after step t's update; a round packed before it is stale"),
    Mutant("excluded_rank_still_updates", "prsgd_hvd/local_sgd.py",
           "if updates and not excluded and not updated:", "if updates and not updated:",
           ("tests/test_robustness.py",)),
    Mutant("gradscaler_skip_ignored", "prsgd_hvd/local_sgd.py",
           "        elif not skip_update:\n            update()",
           "        else:\n            update()",
           ("tests/test_robustness.py",)),
    Mutant("finalize_skips_the_last_round", "prsgd_hvd/join.py",
           "            while rnd.active_ranks:\n                rnd = self._join(e.world.averager)",
           "            while False and rnd.active_ranks:\n                rnd = self._join(e.world.averager)",
           (_traj("uneven_data_finalize_i3"),)),
    Mutant("elastic_restore_keeps_the_stale_round", "prsgd_hvd/overlap.py",
           "        pending = self.release()\n        if pending is not None:\n            pending.abandon()",
           "        pending = self.release()\n        if pending is not None:\n            pass",
           ("tests/test_averaging_unit.py::test_forgetting_a_round_collects_what_completed_and_never_waits",),
           "the round of a world that is gone would stay in flight: the next round refuses to "
           "start, or waits on handles Horovod has dropped"),
    Mutant("elastic_reset_drops_the_outer_momentum", "prsgd_hvd/elastic.py",
           "            self.value._local_sgd.rebind()",
           "            self.value._local_sgd.rebind()\n"
           "            if self.value._local_sgd.outer is not None:\n"
           "                self.value._local_sgd.outer.opt.state.clear()",
           ("tests/test_elastic.py::test_job_grows_and_every_worker_follows_rank0s_model_and_schedule[outer]",),
           "after an elastic grow or shrink every worker would restart DiLoCo's outer momentum "
           "from zero (rank 0's, broadcast to the others, included)"),
    Mutant("checkpoint_forgets_schedule_position", "prsgd_hvd/checkpoint.py",
           "        e.schedule.load_state_dict(local.get(\"schedule\") or {})\n        e.clock.restart_at",
           "        e.clock.restart_at",
           ("tests/test_optimizer_unit.py::test_checkpoint_mid_epoch_resumes_time_varying_where_it_stood",)),
    Mutant("bf16_broadcast_left_to_horovod", "prsgd_hvd/broadcast.py",
           "if torch.is_tensor(tensor) and tensor.dtype == torch.bfloat16:",
           "if False:",
           ("tests/test_trajectories.py::test_mixed_dtypes_match_float64_simulation",),
           "hvd.broadcast_parameters would fail on a model with bf16 parameters"),
    # ---- outer optimizers (outer=) ----------------------------------------------------------
    Mutant("outer_pseudo_gradient_sign_flipped", "prsgd_hvd/outer.py",
           "th.grad = th - ybar  # the pseudo-gradient",
           "th.grad = ybar - th  # the pseudo-gradient",
           (_traj("outer_sgd_momentum_i3_reference_path"),),
           "the outer optimizer would push theta0 away from the ranks' average"),
    Mutant("outer_anchor_not_advanced", "prsgd_hvd/outer.py",
           "        super().advance_anchor(rnd)\n        self.outer.write_anchor(rnd, self._n_params)",
           "        super().advance_anchor(rnd)",
           ("tests/test_trajectories.py::test_outer_moves_the_delta_anchor_to_theta0[2]",),
           "16-bit deltas would be taken from the plain average, not theta0 (larger deltas, "
           "more rounding)"),
    Mutant("outer_step_on_warmup_rounds", "prsgd_hvd/update_rules.py",
           "return self.outer.follow_rule if plan is not None and plan.warmup \\",
           "return self.outer.follow_rule if plan is not None and False \\",
           (_traj("outer_adam_warmup2_i3_finalize"),),
           "warm-up rounds would take outer steps (momentum built on every step)"),
    Mutant("outer_step_skipped_in_finalize", "prsgd_hvd/update_rules.py",
           "            return self.outer.follow_rule if plan is not None and plan.warmup \\\n"
           "                else self.outer.rule_for(rnd, update_follows)",
           "            return self.outer.follow_rule if plan is None or plan.warmup \\\n"
           "                else self.outer.rule_for(rnd, update_follows)",
           (_traj("outer_adam_warmup2_i3_finalize"),),
           "the final model would be the plain average, not the outer-updated one"),
    Mutant("outer_state_not_in_checkpoint", "prsgd_hvd/outer.py",
           "        self.opt.load_state_dict(saved[\"optimizer\"])\n",
           "",
           (_traj("outer_resume_mid_interval_i4"),),
           "a resumed job would restart the outer momentum from zero"),
    Mutant("outer_theta0_not_loaded_from_checkpoint", "prsgd_hvd/outer.py",
           "        for th, a in zip(self.theta, saved[\"anchor\"]):\n            th.copy_(a)\n",
           "",
           (_traj("outer_resume_mid_interval_i4"),),
           "a resumed job would take its pseudo-gradient from the construction-time parameters"),
    Mutant("outer_fused_sgd_bypasses_the_outer_step", "prsgd_hvd/update_rules.py",
           "        if self.outer is not None and self.outer.covers(rnd):",
           "        if self.outer is not None and self.outer.covers(rnd) and not update_follows:",
           (_traj("outer_sgd_momentum_i3"),),
           "Algorithm 1 rounds would be plain averages"),
    # ---- the fused outer round (prsgd_hvd/fused_outer.py) ------------------------------------
    Mutant("fused_outer_drops_nesterov", "prsgd_hvd/fused_outer.py",
           'outer_nesterov=bool(group["nesterov"])', "outer_nesterov=False",
           (_traj("outer_sgd_momentum_i3"),),
           "DiLoCo's Nesterov outer step would silently be heavy-ball momentum"),
    Mutant("fused_outer_steps_before_state_is_averaged", "prsgd_hvd/fused_outer.py",
           "self._runs.append(sorted(runs, key=lambda run: run[0] is not None))",
           "self._runs.append(runs)",
           ("tests/test_fused_outer_unit.py::test_averaged_inner_state_is_averaged_before_the_fused_step",),
           "average_state=True with an outer optimizer: the inner step would use this rank's own momentum"),
    Mutant("fused_outer_anchor_not_moved_to_theta0", "prsgd_hvd/fused_outer.py",
           "        super().advance_anchor(rnd)\n        self.outer.write_anchor(rnd, self._n_params)",
           "        super().advance_anchor(rnd)",
           ("tests/test_trajectories.py::test_outer_moves_the_delta_anchor_to_theta0[2]",),
           "16-bit deltas would be taken from the average, not from theta0 where ranks restarted"),
    Mutant("outer_weights_ignored", "prsgd_hvd/outer.py",
           "yield self._index[id(p)], b.flat[start:start + p.numel()].view(p.shape) * rnd.scale",
           "yield self._index[id(p)], b.flat[start:start + p.numel()].view(p.shape) / len(rnd.members)",
           ("tests/test_streaming.py::test_streaming_heterogeneous_matches_float64_reference[3]",),
           "Algorithm 3's weighted averages would lose their weights in the outer step"),
    Mutant("outer_step_on_group_rounds", "prsgd_hvd/outer.py",
           "return any(rnd.anchor is a for a in self.whole_set_anchors())",
           "return True",
           ("tests/test_trajectories.py::test_grouped_averaging_matches_float64_simulation"
            "[outer_hierarchical_pairs_every_2_all_every_6]",),
           "Hierarchical group rounds would take outer steps from a theta0 of the whole set"),
    # ---- theta0 in host memory (outer_device=, prsgd_hvd/outer_host.py) and SlowMo ------------
    Mutant("outer_host_momentum_not_copied_back", "prsgd_hvd/outer_host.py",
           "                    h.copy_(value)\n                    kept[key] = h",
           "                    kept[key] = h",
           ("tests/test_outer_unit.py::test_outer_device_gives_the_same_bits_from_host_memory",
            _traj("outer_sgd_momentum_i3_host")),
           "with outer_device the outer momentum would be whatever the host tensor held before "
           "the round (uninitialised memory at the first one)"),
    Mutant("outer_host_theta0_not_copied_back", "prsgd_hvd/outer_host.py",
           "        dev.grad = None\n        host.copy_(dev)\n",
           "        dev.grad = None\n",
           (_traj("outer_sgd_momentum_i3_host"),),
           "with outer_device the ranks would restart from theta0' once, but the next "
           "pseudo-gradient would be taken from the old theta0"),
    Mutant("outer_host_not_staged_when_devices_match", "prsgd_hvd/outer.py",
           "        if device is None:\n            return contextlib.nullcontext()",
           "        if device is None or device == self.host.device:\n"
           "            return contextlib.nullcontext()",
           ("tests/test_trajectories.py::test_outer_host_memory_changes_nothing[2]",),
           "a CPU run would no longer exercise the copy path a GPU job takes (same values, "
           "untested code)"),
    Mutant("slowmo_divides_by_the_old_lr", "prsgd_hvd/slowmo.py",
           "u.mul_(beta).add_(p.grad, alpha=1.0 / gamma)",
           "u.mul_(beta).add_(p.grad, alpha=1.0 / state.get(\"inner_lr\", gamma))",
           ("tests/test_outer_unit.py::test_slowmo_over_the_inner_optimizer_follows_its_changing_lr",
            _traj("outer_slowmo_steplr_i3_resume")),
           "SlowMo's slow momentum would add the pseudo-gradient scaled by the previous outer "
           "step's inner lr"),
    Mutant("slowmo_inner_lr_read_once", "prsgd_hvd/outer.py",
           "        gamma = inner_lr_of(inner)\n",
           "        gamma = (lambda frozen: lambda: frozen)(inner_lr_of(inner)())\n",
           (_traj("outer_slowmo_steplr_i3_resume"),),
           "slowmo(opt, ...) would be the SGD form again: exact only while the inner lr stays "
           "what it was at construction"),
    # ---- streaming rounds (delay=, fragments=) -------------------------------------------------
    Mutant("delayed_merge_drops_local_progress", "prsgd_hvd/streaming.py",
           "        rnd = MergeRound.of(r.averager.layout, r.identity, r.averager.sent)\n",
           "        rnd = MergeRound.of(r.averager.layout, r.identity, r.averager.sent)\n"
           "        [t.detach().zero_() for t in r.averager.layout.tensors]\n",
           (_stream("d2_i4_fused_merge"),),
           "a delayed round would throw away the tau local steps taken while it was in flight"),
    Mutant("delayed_merge_one_step_early", "prsgd_hvd/streaming.py",
           "                self.start(p, rplan, t, merge_at=t + self.delay)",
           "                self.start(p, rplan, t, merge_at=t + self.delay - 1)",
           (_stream("d2_i4_fused_merge"),),
           "rounds would merge after tau-1 local steps, not tau"),
    Mutant("epoch_round_merges_a_step_early", "prsgd_hvd/streaming.py",
           "self.start(p, rplan, t, merge_at=t + 1 + self.delay)",
           "self.start(p, rplan, t, merge_at=t + self.delay)",
           (_stream("time_varying_d1_finalize"),),
           "Algorithms 2 and 3 would merge their epoch rounds one local step too early"),
    Mutant("fragment_offset_wrong", "prsgd_hvd/fragments.py",
           "        return [((t // step) % self.fragments, AVERAGE_BEFORE)]",
           "        return [((t // step + 1) % self.fragments, AVERAGE_BEFORE)]",
           (_stream("f3_d0_i6"),),
           "fragment p would be averaged at another fragment's offset"),
    Mutant("correction_sign_flipped", "prsgd_hvd/streaming.py",
           "            torch.sub(b.payload, sent[b.index], out=sent[b.index])",
           "            torch.sub(sent[b.index], b.payload, out=sent[b.index])",
           (_stream("d2_i4_fused_merge"),),
           "a merge would move the model away from the average"),
    Mutant("outer_step_skipped_when_streaming", "prsgd_hvd/streaming.py",
           "        if outer is not None:\n            outer.step_from(rnd, r.n_params)",
           "        if False:\n            outer.step_from(rnd, r.n_params)",
           (_stream("f3_d4_i6_outer_uneven_finalize"),),
           "streamed rounds would be plain averages with outer="),
    Mutant("checkpoint_drops_rounds_in_flight", "prsgd_hvd/checkpoint.py",
           "            local[\"in_flight\"] = in_flight",
           "            local[\"in_flight\"] = []",
           (_stream("f2_d3_i4_resume_two_in_flight"),),
           "a resumed job would lose the rounds that were in flight at the checkpoint"),
    Mutant("finalize_does_not_drain", "prsgd_hvd/join.py",
           "            e.streaming.drain()",
           "            e.streaming.in_flight.clear()",
           (_stream("d2_i4_uneven_finalize"),),
           "finalize() would drop a finishing rank's rounds in flight"),
    # ---- overlap with outer=, fragments on epochs ----------------------------------------------
    Mutant("finalize_keeps_the_round_after_a_prestart", "prsgd_hvd/join.py",
           "        return final > 0 and self.previous_active == final",
           "        return False",
           ("tests/test_trajectories.py::test_outer_overlap_changes_nothing[2]",),
           "with overlap, finalize() would take one more outer step (and resend the 16-bit "
           "residuals) than without"),
    Mutant("finalize_drops_a_round_someone_trained_for", "prsgd_hvd/join.py",
           "        return final > 0 and self.previous_active == final",
           "        return final > 0",
           (_traj("outer_uneven_prestarted_finalize_i3"),),
           "a finished rank would skip the round of a rank that took the prestarted step"),
    Mutant("fragment_round_within_an_epoch_ends_it", "prsgd_hvd/fragments.py",
           "        return self.epochs is None or p == 0",
           "        return True",
           (_stream("time_varying_f2_d3_outer_finalize"),),
           "every fragment's round would start a new epoch: epochs F times too short"),
    Mutant("epoch_fragments_spread_over_the_wrong_steps", "prsgd_hvd/fragments.py",
           "        return None if k % (K // F) else (k // (K // F)) % F",
           "        return None if k % (K // F) else (k // (K // F) + 1) % F",
           (_stream("time_varying_f3_d0_finalize"),),
           "fragment p would be averaged at another fragment's place in the epoch"),
    Mutant("epoch_fragment_rounds_ignore_the_weights", "prsgd_hvd/fragments.py",
           "weight=self.epochs.epoch_end_plan().weight)",
           "weight=1.0)",
           ("tests/test_streaming.py::test_streaming_heterogeneous_matches_float64_reference[3]",),
           "Algorithm 3's weights='steps' would hold for fragment 0 only"),
    Mutant("finished_rank_walks_the_epoch_cycle_late", "prsgd_hvd/fragments.py",
           "        p = 1 if k == 0 else k // (self.epochs.epoch_steps() // self.fragments) + 1",
           "        p = 1 if k == 0 else k // (self.epochs.epoch_steps() // self.fragments) + 2",
           ("tests/test_streaming_unit.py",),
           "a rank finishing mid-epoch would wait on the wrong fragment's round: a hang"),
    # ---- the one-pass delayed merge (accumulate mode of the unflatten kernels) -----------------
    Mutant("accumulate_drops_x_old_in_the_vector_loop", "csrc/cpu_kernels_impl.h",
           "        x0 = p0 + x0;\n        x1 = p1 + x1;\n",
           "        x0 = p0 + x0;\n",
           ("tests/test_ops.py::test_accumulate_matches_reference_bit_for_bit",),
           "a delayed merge on CPU would replace half of every vector step's parameters by the "
           "correction c - x_sent instead of adding it: the local progress and x_sent lost"),
    Mutant("fused_merge_overwrites_instead_of_adding", "prsgd_hvd/fused_sgd.py",
           "first_step=firsts, divergence=acc, align=ALIGN, accumulate=accumulate)",
           "first_step=firsts, divergence=acc, align=ALIGN)",
           (_stream("d2_i4_fused_merge"),),
           "with torch.optim.SGD a delayed merge would set the parameters to the correction "
           "(then step from there) instead of adding it"),
    Mutant("plain_merge_overwrites_instead_of_adding", "prsgd_hvd/update_rules.py",
           "kernels.unflatten_average_(b.payload, b.tensors, scale=self.scale, align=ALIGN,\n"
           "                                           accumulate=True)",
           "kernels.unflatten_average_(b.payload, b.tensors, scale=self.scale, align=ALIGN)",
           (_stream("d1_i3_adam_warmup2"),),
           "with Adam, or fragments, a delayed merge would overwrite the tensors with the "
           "correction"),
    # ---- 8-bit deltas (compression="int8", Int8Delta) ----------------------------------------
    Mutant("int8_scale_from_the_chunk_sum", "prsgd_hvd/wire_formats.py",
           "        amax = torch.amax(d.abs(), dim=1, keepdim=True)",
           "        amax = d.abs().sum(dim=1, keepdim=True)",
           ("tests/test_int8_unit.py::test_encode_decode_equal_the_reference_bit_for_bit",),
           "each chunk's step would be sum|d|/127 instead of max|d|/127: most codes round to 0 "
           "and every round sends a fraction of the change"),
    Mutant("int8_residual_not_carried", "prsgd_hvd/wire_formats.py",
           "                self._keep_lost(index, delta, work, weight)",
           "                pass",
           ("tests/test_int8_unit.py::test_error_feedback_keeps_rounding_from_accumulating",
            "tests/test_trajectories.py::test_int8_error_feedback_makes_a_difference[2]"),
           "error_feedback=True would do nothing for int8: the rounding of every round adds up"),
    Mutant("int8_decode_sums_the_ranks_in_another_order", "prsgd_hvd/wire_formats.py",
           "        for i, r in enumerate(range(size)):",
           "        for i, r in enumerate(reversed(range(size))):",
           ("tests/test_int8_unit.py::test_encode_decode_equal_the_reference_bit_for_bit",),
           "the fp32 sum of the decoded messages would differ in its last bits from the "
           "documented rank-order sum (a decoder in another order than its peers' would leave "
           "the ranks on different models)"),
    Mutant("int8_nonfinite_chunk_sent_as_zeros", "prsgd_hvd/wire_formats.py",
           "        scale.copy_(amax / 127)",
           "        scale.copy_((amax / 127).nan_to_num(0.0, 0.0, 0.0))",
           ("tests/test_int8_unit.py::test_zero_huge_tiny_and_nonfinite_chunks",),
           "a rank's inf/NaN would reach nobody: its chunk decoded as zeros, the round finite, "
           "the non-finite policy never asked"),
]
