"""Billing: plans, subscriptions, wallets with holds, a double-entry ledger, invoices and provider statements."""
