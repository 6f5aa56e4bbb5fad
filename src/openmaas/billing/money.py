"""Money as integer micro-units (1 currency unit = 1,000,000 micros). No floats anywhere in billing."""

from __future__ import annotations

from fractions import Fraction

MICROS = 1_000_000


def round_half_even(value: Fraction) -> int:
    """Whole micros, ties to even; used only where an invoice line is fixed."""
    return round(value)  # Fraction.__round__ rounds half to even


def format_micros(micros: int, currency: str = "") -> str:
    """``161725000`` -> ``161.725000`` (six decimals: exact, never a float)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    text = f"{sign}{whole}.{frac:06d}"
    return f"{text} {currency}".strip()


def parse_amount(text: str) -> int:
    """``"100.5"`` -> ``100500000`` micros, exactly (no floats); more than six decimals is an error."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"'{text}' is not an amount") from None
    micros = value * MICROS
    if micros != micros.to_integral_value():
        raise ValueError(f"'{text}' has more than six decimals")
    return int(micros)
