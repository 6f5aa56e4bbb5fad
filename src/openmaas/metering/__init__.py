"""Metering: one durable usage record per successful call, written with group commit."""
