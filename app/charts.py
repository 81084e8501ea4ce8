"""Charts for the admin pages, drawn on the server as inline SVG: every page works with no internet and no
script. Each takes plain numbers and labels and returns markup; labels are escaped."""
from markupsafe import Markup, escape

BAR = 18  # px per bar of a bar chart
LABEL = 90  # px for the labels left of the bars


def bars(items, title, width=480):
    """Horizontal bars: [(label, value)], longest bar for the largest value."""
    largest = max((value for _, value in items), default=0) or 1
    scale = (width - LABEL - 50) / largest
    rows = []
    for i, (label, value) in enumerate(items):
        y = i * (BAR + 6)
        rows.append(f'<text x="0" y="{y + BAR - 5}">{escape(label)}</text>'
                    f'<rect x="{LABEL}" y="{y}" width="{max(value * scale, 1):.1f}" height="{BAR}" fill="#4a7bb7"/>'
                    f'<text x="{LABEL + value * scale + 6:.1f}" y="{y + BAR - 5}">{value}</text>')
    height = max(len(items) * (BAR + 6), BAR)
    return Markup(f'<svg role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
                  f'viewBox="0 0 {width} {height}" font-size="12"><title>{escape(title)}</title>{"".join(rows)}</svg>')


def daily(days, series, title, width=640, height=160):
    """Vertical bars per day, one per series side by side: `days` [(date, (value, ...))], `series` the
    names of the values, in the colours of SERIES_COLOURS."""
    largest = max((value for _, values in days for value in values), default=0) or 1
    slot = width / max(len(days), 1)
    bar = max(slot / (len(series) + 1), 1)
    drawn = []
    for i, (day, values) in enumerate(days):
        for j, value in enumerate(values):
            tall = value / largest * (height - 20)
            drawn.append(f'<rect x="{i * slot + j * bar:.1f}" y="{height - 14 - tall:.1f}" width="{bar:.1f}" '
                         f'height="{tall:.1f}" fill="{SERIES_COLOURS[j]}"><title>{escape(day)}: {value} '
                         f'{escape(series[j])}</title></rect>')
        if i % 7 == 0:
            drawn.append(f'<text x="{i * slot:.1f}" y="{height - 2}">{escape(day)[5:]}</text>')
    legend = ' '.join(f'<tspan fill="{SERIES_COLOURS[j]}">■ {escape(name)}</tspan>' for j, name in enumerate(series))
    return Markup(f'<svg role="img" aria-label="{escape(title)}" width="{width}" height="{height + 16}" '
                  f'viewBox="0 0 {width} {height + 16}" '
                  f'font-size="11"><title>{escape(title)}</title><text x="0" y="10">{legend}</text>'
                  f'<g transform="translate(0 16)">{"".join(drawn)}</g></svg>')


SERIES_COLOURS = ('#4a7bb7', '#6aa84f', '#e69138')
