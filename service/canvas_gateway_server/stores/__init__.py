"""The state wing: every backend of the gateway's two state ports, and the choice among them.

The ports are where their users define them: `idempotency.ResultStore` (claims and kept results
under idempotency keys) and `rate_budget.BudgetStore` (what is known of each Braze budget).

    memory          this process's (`LocalResults`, `TableBudgets` over a dict)
    host_results    one SQLite file a host's workers share, kept across restarts
    host_budgets    one mapped file a host's workers share
    redis           every replica's, through Redis (`redis_scripts` holds its Lua)
    failover        the shared budgets, failing open or closed while Redis does not answer
    heartbeat       how a shared store knows which processes still run
    wiring          which of them a gateway uses, from its settings, with their lifecycle
"""
