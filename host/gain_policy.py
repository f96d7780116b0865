"""The measured-gain budgeted policy as a runtime restoration policy (`--policy gain-budget:BYTES`).

Per token and layer, each selected expert gets one option (nothing, a rank-r prefix of its
compensator, or its higher-precision copy) so that the sum over the token's slots of
w^p x measured gain is largest within BYTES: the multiple-choice knapsack of
host/budget_policy.py (`solve`, the accuracy study's solver), over the gain tables measured on
the store's own bytes and kept with it (host/gain_tables.py).

Options are those the run executes: ranks at the run's factor precision (`--factors`) and the
store's copy (`--hi-bits`); the study's policy also mixes factor precisions and int4 with int8
copies in one run, which the runtime's plans (one factor precision, one copy width) do not.
Each token is decided alone from static prices (the study's bytes per token), not from what the
cache holds, so the runtime decides exactly what the study's budgeted block decides for the same
tokens, tables and power of the router weight. The power here is the tables' fitted one: the
study's `--budgets` rows choose theirs per budget by the layer error on the calibration rows
(budget_study.choose_power), which a run that opens a store with its tables does not have.
"""
from __future__ import annotations


import torch

from .budget_policy import OptionTable, check_budget, slot_scale, solve, solve_one
from .policy import Restoration, parse_budget


class GainBudgetPolicy:
    """Spend at most `budget_bytes` per token and layer by measured gain (module text). Made
    unbound by get_policy; `bind` gives it the store's tables for a run's options."""
    row_wise = True
    needs_sensitivity = False
    needs_gain_tables = True

    def __init__(self, budget_bytes: float, tables: dict[int, OptionTable] | None = None,
                 weight_power: float = 2.0, repair_rounds: int = 2):
        self.budget_bytes = check_budget(budget_bytes)
        self.tables, self.weight_power, self.repair_rounds = tables, float(weight_power), repair_rounds
        self._maps = {} if tables is None else {l: _option_map(t) for l, t in tables.items()}

    @property
    def name(self) -> str:
        return f"gain-budget@{self.budget_bytes / 1e3:.1f}kB"

    def bind(self, tables, precision: str, hi_bits: int | None) -> "GainBudgetPolicy":
        """The policy over `tables` (gain_tables.GainTables), restricted to ranks at `precision`
        and copies at `hi_bits` (None: no copies), with the tables' fitted router-weight power."""
        return GainBudgetPolicy(self.budget_bytes, {l: tables.table(l, precision, hi_bits) for l in tables.gain},
                                tables.weight_power, self.repair_rounds)

    def table(self, layer: int | None) -> OptionTable:
        if self.tables is None:
            raise ValueError("the gain-budget policy decides by a store's gain tables: bind it to them first "
                             "(GainBudgetPolicy.bind(gain_tables.load_gain_tables(store), ...))")
        if layer not in self.tables:
            raise ValueError(f"no gain table for layer {layer!r} (the context's store layer); "
                             f"tables cover {sorted(self.tables)}")
        return self.tables[layer]

    def choose(self, ids: torch.Tensor, weights: torch.Tensor, layer: int | None) -> torch.Tensor:
        """Option index per (token, slot) [T, K] into `table(layer).options`."""
        return solve(self.table(layer), ids, weights, self.budget_bytes, self.weight_power, self.repair_rounds)

    def decide(self, ids, weights, ctx) -> Restoration:
        rows = self.choose(ids, weights, ctx.layer).tolist()
        rank_of, hi_of = self._maps[ctx.layer]
        return Restoration(tuple([tuple([rank_of[c] for c in row]) for row in rows]),
                           tuple([tuple([hi_of[c] for c in row]) for row in rows]))

    def decide_rows(self, id_rows: list[list[int]], weights: torch.Tensor, ctx) -> Restoration:
        """`decide` on the ids as lists (the planner's hot path): one token (batch-1 decode) is
        solved on lists end to end, the same choices as `decide`."""
        if len(id_rows) != 1:
            return self.decide(torch.tensor(id_rows, dtype=torch.long), weights, ctx)
        if weights.shape != (1, len(id_rows[0])):
            raise ValueError(f"ids and weights must both be [T, K], not {(1, len(id_rows[0]))} and "
                             f"{tuple(weights.shape)}")
        choice = solve_one(self.table(ctx.layer), id_rows[0], slot_scale(weights, self.weight_power)[0].tolist(),
                           self.budget_bytes, self.repair_rounds)
        rank_of, hi_of = self._maps[ctx.layer]
        return Restoration((tuple([rank_of[c] for c in choice]),), (tuple([hi_of[c] for c in choice]),))


def parse_gain_budget(spec: str) -> GainBudgetPolicy:
    """'gain-budget:BYTES' (per token and MoE layer) as an unbound policy."""
    return GainBudgetPolicy(parse_budget(spec, "gain-budget:"))


def _option_map(table: OptionTable) -> tuple[list[int], list[bool]]:
    """Per option: the rank it applies and whether it is the copy (what a Restoration holds)."""
    return ([o.rank if o.kind == "factors" else 0 for o in table.options],
            [o.kind == "copy" for o in table.options])
