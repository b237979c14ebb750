"""How strongly does each event type signal a purchase? The evidence behind the default event weights.

For every (user, item) pair with an event of type T, the share of pairs the user buys (later or at the
same time) measures how much T says about intent. Run on the Taobao UserBehavior sample:

    .venv/bin/python scripts/event_weights.py ../shared/data/taobao/UserBehavior_head84475.csv
"""

from __future__ import annotations

import argparse
import json

import pandas as pd


def purchase_rates(events: pd.DataFrame) -> pd.DataFrame:
    buys = events[events.behavior == "buy"].groupby(["user", "item"]).ts.max().rename("buy_ts")
    first = events.groupby(["user", "item", "behavior"]).ts.min().rename("first_ts").reset_index()
    pairs = first.join(buys, on=["user", "item"])
    pairs["bought_after"] = pairs.buy_ts.ge(pairs.first_ts)
    out = pairs.groupby("behavior").agg(pairs=("item", "size"), bought=("bought_after", "sum"))
    out["purchase_rate"] = out.bought / out.pairs
    out["relative_to_view"] = out.purchase_rate / out.loc["pv", "purchase_rate"]
    return out.sort_values("purchase_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="Taobao UserBehavior CSV (user, item, category, behavior, ts)")
    args = parser.parse_args()
    events = pd.read_csv(args.path, names=["user", "item", "category", "behavior", "ts"])
    rates = purchase_rates(events)
    print(rates.to_string(float_format=lambda x: f"{x:.4f}"))
    print(json.dumps(rates.purchase_rate.round(5).to_dict()))


if __name__ == "__main__":
    main()
