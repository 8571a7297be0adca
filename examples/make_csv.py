"""Write examples/data/churn.csv: a small synthetic table with categorical columns,
missing values (numeric and categorical) and string class labels.

Deterministic (seeded); `make demo` and `make test` run it, so nothing is fetched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd


def make_churn(rows: int = 1200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], size=rows, p=[0.5, 0.3, 0.2])
    region = rng.choice(["north", "south", "east", "west"], size=rows)
    tenure = rng.gamma(2.0, 12.0, size=rows).round(1)
    charges = (
        rng.normal(50, 15, size=rows) + np.select([plan == "plus", plan == "pro"], [20, 45], 0)
    ).round(2)
    tickets = rng.poisson(1.5, size=rows).astype(float)
    logit = (
        0.9 * tickets
        - 0.06 * tenure
        + 0.02 * (charges - 60)
        + np.where(region == "south", 0.8, 0)
        - 0.2
    )
    churn = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "churned", "stayed")
    df = pd.DataFrame(
        {
            "plan": plan,
            "region": region,
            "tenure_months": tenure,
            "monthly_charges": charges,
            "support_tickets": tickets,
            "churn": churn,
        }
    )
    # Missing values: 5% of tenure and charges, 4% of region.
    for col, frac in (("tenure_months", 0.05), ("monthly_charges", 0.05), ("region", 0.04)):
        df.loc[rng.random(rows) < frac, col] = None
    return df


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data" / "churn.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    make_churn().to_csv(out, index=False)
    print(f"wrote {out}")
