"""The dashboard's HTML: one small server-rendered shell per page (navigation, headings, empty
tables and chart areas), filled in by static/dashboard.js from the page's JSON endpoint. Every value
placed in the HTML is escaped; scripts and styles come only from the dashboard's own static files
(the Content-Security-Policy forbids anything else)."""

from __future__ import annotations

from html import escape
from typing import Final

PAGES: Final = (
    ("overview", "", "Overview"),
    ("users", "users", "Users"),
    ("models", "models", "Models and clusters"),
    ("live", "live", "Live"),
    ("batches", "batches", "Batches"),
)

_RANGES: Final = ((1, "today (UTC)"), (7, "7 days"), (30, "30 days"), (90, "90 days"), (365, "a year"))

_SECTIONS: Final[dict[str, tuple[tuple[str, str, str], ...]]] = {
    # page -> (kind, id, caption): "chart" draws a series of a table; "table" shows one, "folded"
    # behind a disclosure (long tables whose chart says the same); "totals" lists the totals
    "overview": (
        ("totals", "totals", "Totals"),
        ("chart", "per_day", "Requests and tokens per day"),
        ("table", "per_day", "Per day"),
        ("chart", "per_hour", "Requests per hour (last 48 hours)"),
        ("folded", "per_hour", "Per hour (last 48 hours)"),
        ("table", "by_cluster", "By cluster"),
        ("table", "by_model", "By model"),
    ),
    "users": (("table", "users", "Users"),),
    "user": (
        ("chart", "per_day", "Requests and tokens per day"),
        ("table", "per_day", "Per day"),
        ("table", "by_model", "By model"),
    ),
    "models": (("table", "by_model", "By model"), ("table", "by_cluster", "By cluster")),
    "live": (
        ("totals", "now", "In flight now"),
        ("table", "in_flight", "Requests in flight by route"),
        ("table", "recent", "Last 15 minutes by endpoint"),
        ("table", "cluster_jobs", "Jobs on the clusters (their job reports)"),
    ),
    "batches": (
        ("table", "by_status", "Batches by status"),
        ("table", "batches", "Latest batches (the batch API)"),
        ("table", "cluster_batches", "Private batch jobs on the clusters (their job reports)"),
    ),
}


def render(
    base: str, page: str, title: str, user: str, csrf: str, days: int, extra: dict[str, str] | None = None
) -> str:
    """A page's shell; ``extra`` are data attributes the script passes on to the JSON endpoint."""
    current = ' aria-current="page"'
    nav = "".join(
        f'<li><a href="{base}/{slug}"{current if key == page else ""}>{label}</a></li>'
        for key, slug, label in PAGES
    )
    data = "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in (extra or {}).items())
    controls = ""
    if page in ("overview", "users", "user", "models"):
        options = "".join(
            f'<option value="{value}"{" selected" if value == days else ""}>{label}</option>'
            for value, label in _RANGES
        )
        search = ""
        if page == "users":
            search = (
                '<label for="search">Search users</label>'
                '<input id="search" name="q" type="search" autocomplete="off"'
                ' placeholder="part of a username">'
            )
        controls = (
            '<form class="controls" id="controls" role="search">'
            f'<label for="days">Period</label><select id="days" name="days">{options}</select>{search}</form>'
        )
    sections = "".join(_section(kind, ident, caption) for kind, ident, caption in _SECTIONS[page])
    return _document(
        base,
        title,
        f'<header><nav aria-label="Dashboard pages"><ul>{nav}</ul></nav>'
        f'<form method="post" action="{base}/logout" class="logout">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        f'<span class="who">{escape(user)}</span> <button type="submit">Log out</button></form></header>'
        f'<main id="main" data-page="{page}" data-base="{base}"{data}>'
        f'<h1>{escape(title)}</h1>{controls}<p id="status" role="status" aria-live="polite"></p>'
        f"{sections}</main>",
    )


def _section(kind: str, ident: str, caption: str) -> str:
    if kind == "chart":
        return (
            f'<figure class="chart" id="chart-{ident}" data-table="{ident}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )
    if kind == "totals":
        return (
            f'<section aria-label="{escape(caption)}"><dl class="totals" id="totals-{ident}"></dl></section>'
        )
    if kind == "folded":
        return f"<details><summary>{escape(caption)}</summary>{_section('table', ident, caption)}</details>"
    return (
        f'<section class="table" id="table-{ident}" data-table="{ident}"><h2>{escape(caption)}</h2>'
        f'<p><a class="csv" href="#">Download as CSV</a></p>'
        f'<div class="scroll" tabindex="0" role="region" aria-label="{escape(caption)}">'
        f'<table><caption class="visually-hidden">{escape(caption)}</caption><thead></thead><tbody></tbody>'
        "</table></div></section>"
    )


def login_page(base: str, *, globus: bool, csrf: str, message: str = "") -> str:
    notice = f'<p class="notice" role="alert">{escape(message)}</p>' if message else ""
    if globus:
        form = f'<p><a class="button" href="{base}/login/globus">Log in with Globus</a></p>'
    else:
        form = (
            f'<form method="post" action="{base}/login" class="login">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            '<label for="token">Administrator token</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" required>'
            '<button type="submit">Log in</button></form>'
        )
    return _document(
        base,
        "Log in",
        f'<main id="main" class="narrow"><h1>Gateway dashboard</h1>{notice}'
        f"<p>Usage of the inference gateway, for its administrators.</p>{form}</main>",
    )


def refusal_page(base: str, message: str) -> str:
    return _document(
        base,
        "Not allowed",
        '<main id="main" class="narrow"><h1>Not allowed</h1>'
        f'<p class="notice" role="alert">{escape(message)}</p>'
        f'<p><a href="{base}/login">Log in as someone else</a></p></main>',
    )


def _document(base: str, title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · Gateway dashboard</title>"
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{base}/static/vendor/uPlot.min.css">'
        f'<link rel="stylesheet" href="{base}/static/dashboard.css">'
        f'<script defer src="{base}/static/vendor/uPlot.iife.min.js"></script>'
        f'<script defer src="{base}/static/dashboard.js"></script></head>'
        f'<body><a class="skip" href="#main">Skip to content</a>{body}</body></html>'
    )
