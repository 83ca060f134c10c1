"""The pages of the human-study app (:mod:`spade_lib.study`): its Jinja templates.

Autoescaped HTML with the CSS and the JavaScript inline, so nothing is loaded from elsewhere: the
start page (the rater's name), the three instruction pages of Figure H.10 (the four images, a
worked example whose answer shows after the pick, how to decline), the task page, the end page
and the error page. :data:`CSP` is the Content-Security-Policy the app sends with them.
"""

from __future__ import annotations

__all__ = ["CSP", "TEMPLATES"]

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} - Neuron visualization study</title>
<link rel="icon" href="data:,">
<style>
  :root { --ink: #1d2530; --muted: #5b6675; --line: #d8dde4; --accent: #2458c6;
          --good: #1b8a4a; --bad: #b3261e; --paper: #ffffff; --bg: #f3f5f8; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--ink);
         font: 17px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
  header { background: var(--ink); color: #fff; padding: 10px 24px; display: flex;
           justify-content: space-between; align-items: center; }
  header .brand { font-weight: 600; letter-spacing: .02em; }
  main { max-width: 1140px; margin: 24px auto; padding: 24px 32px; background: var(--paper);
         border: 1px solid var(--line); border-radius: 10px; }
  h1 { font-size: 1.55em; margin: 0 0 .4em; }
  p.lead { font-size: 1.08em; color: var(--muted); margin-top: 0; }
  .step { color: var(--muted); font-size: .9em; text-transform: uppercase; letter-spacing: .06em; }
  .grid { display: flex; flex-wrap: wrap; gap: 18px; justify-content: center; margin: 18px 0; }
  .group { display: flex; gap: 18px; padding: 12px; border-radius: 10px; }
  .group.ref { background: #eef2f8; }
  .group.options { background: #f7f3ea; }
  figure { margin: 0; text-align: center; }
  figure img { width: 240px; height: 240px; object-fit: contain; image-rendering: pixelated;
               background: #fff; border: 3px solid var(--line); border-radius: 6px;
               display: block; }
  figcaption { margin-top: 6px; font-weight: 600; }
  figcaption small { display: block; font-weight: 400; color: var(--muted); max-width: 240px; }
  figure.match img { border-color: var(--good); box-shadow: 0 0 0 3px #bfe6cf; }
  .question { text-align: center; font-size: 1.15em; font-weight: 600; margin: 8px 0 4px; }
  .buttons { display: flex; gap: 14px; justify-content: center; margin: 14px 0 6px;
             flex-wrap: wrap; }
  button, a.button { font: inherit; font-weight: 600; padding: 11px 26px; border-radius: 8px;
             border: 2px solid var(--accent); background: var(--accent); color: #fff;
             cursor: pointer; text-decoration: none; display: inline-block; min-width: 130px;
             text-align: center; }
  button.secondary, a.button.secondary { background: #fff; color: var(--accent); }
  button.decline { background: #fff; color: var(--muted); border-color: #aab2bd; }
  button:disabled { opacity: .5; cursor: wait; }
  .note { background: #f0f6ff; border-left: 4px solid var(--accent); padding: 10px 16px;
          border-radius: 4px; margin: 16px 0; }
  .answer { background: #eaf7ef; border-left: 4px solid var(--good); padding: 10px 16px;
            border-radius: 4px; margin: 16px 0; }
  .answer.wrong { background: #fdeeee; border-left-color: var(--bad); }
  .error { color: var(--bad); font-weight: 600; }
  .progress { display: flex; align-items: center; gap: 14px; margin-bottom: 6px; }
  .progress progress { flex: 1; height: 14px; }
  .progress span { font-weight: 600; white-space: nowrap; }
  form.start { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin: 18px 0; }
  input[type=text] { font: inherit; padding: 10px 12px; border: 2px solid var(--line);
                     border-radius: 8px; min-width: 260px; }
  ol.legend li { margin: 4px 0; }
  .nav { display: flex; justify-content: space-between; margin-top: 18px; }
</style>
</head>
<body>
<header><span class="brand">Neuron visualization study</span>
{% if rater %}<span>Rater: <b id="rater">{{ rater }}</b></span>{% endif %}</header>
<main>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

_FOUR = """{% macro four(src, match=None, captions=False) %}
<div class="grid">
  <div class="group ref">
    <figure><img src="{{ src('full') }}" alt="full image">
      <figcaption>Full image{% if captions %}<small>the whole input image</small>{% endif %}
      </figcaption></figure>
    <figure><img src="{{ src('vis') }}" alt="neuron visualization">
      <figcaption>Neuron visualization{% if captions %}<small>what one neuron of the classifier
      responds to</small>{% endif %}</figcaption></figure>
  </div>
  <div class="group options">
    <figure class="{{ 'match' if match == 'left' }}"><img src="{{ src('left') }}" alt="left crop">
      <figcaption>Left crop{% if captions %}<small>one part of the full image</small>{% endif %}
      </figcaption></figure>
    <figure class="{{ 'match' if match == 'right' }}"><img src="{{ src('right') }}"
      alt="right crop">
      <figcaption>Right crop{% if captions %}<small>another part of the full image</small>
      {% endif %}</figcaption></figure>
  </div>
</div>
{% endmacro %}
"""

_START = """{% extends "base.html" %}
{% block main %}
<h1>Welcome</h1>
<p class="lead">In this study you will look at {{ total }} short tasks. In each, you decide which of
two parts of an image looks more like a picture of what a neuron of an image classifier responds
to. A task takes a few seconds; a short introduction comes first.</p>
<form class="start" method="get" action="{{ url_for('start') }}">
  <label for="rater-input"><b>Your rater id</b></label>
  <input id="rater-input" type="text" name="rater" value="{{ value }}" maxlength="40" required
         pattern="[A-Za-z0-9_\\-]{1,40}" autocomplete="off" autofocus
         placeholder="e.g. alice or rater_07">
  <button type="submit" id="start">Start</button>
</form>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<p class="note">A rater id is a short name: 1 to 40 letters, digits, <code>-</code> or
<code>_</code>. If you stop and come back later with the same id, you continue where you left
off.</p>
{% endblock %}
"""

_INSTRUCTIONS_1 = """{% extends "base.html" %}{% from "four.html" import four %}
{% block main %}
<div class="step">Introduction, step 1 of 3</div>
<h1>What you will see</h1>
<p class="lead">Each task shows four images side by side.</p>
{{ four(src, captions=True) }}
<ol class="legend">
  <li><b>Full image</b>: the whole input image that the classifier saw.</li>
  <li><b>Neuron visualization</b>: a picture made to excite one output neuron of the classifier,
  so it shows the patterns that neuron looks for. We do not tell you which class the neuron stands
  for.</li>
  <li><b>Left crop</b> and <b>right crop</b>: two versions of the full image, each cropped to
  reveal only a part of it.</li>
</ol>
<p class="note">Your job: pick the crop that <b>more closely resembles the neuron
visualization</b>. Look for shared shapes, textures and colours; the visualization is usually
repeated and distorted, so do not expect an exact copy.</p>
<div class="nav"><span></span>
<a class="button" id="next" href="{{ url_for('instructions', rater=rater, step=2) }}">Next: a worked
example</a></div>
{% endblock %}
"""

_INSTRUCTIONS_2 = """{% extends "base.html" %}{% from "four.html" import four %}
{% block main %}
<div class="step">Introduction, step 2 of 3</div>
<h1>A worked example</h1>
<p class="lead">Try it: which crop more closely resembles the neuron visualization?</p>
{{ four(src, match=example.answer if pick else None) }}
{% if not pick %}
<div class="buttons">
  <a class="button" id="pick-left" href="{{ url_for('instructions', rater=rater, step=2,
     pick='left') }}">Left</a>
  <a class="button" id="pick-right" href="{{ url_for('instructions', rater=rater, step=2,
     pick='right') }}">Right</a>
</div>
{% else %}
<div class="answer{{ '' if pick == example.answer else ' wrong' }}" id="answer">
  <b>The answer is: {{ example.answer|capitalize }}.</b> {{ example.why }}<br>
  {% if pick == example.answer %}You picked {{ pick }}: that is the match.
  {% else %}You picked {{ pick }}; the match is the {{ example.answer }} crop (outlined in
  green).{% endif %}
</div>
<div class="nav">
<a class="button secondary" href="{{ url_for('instructions', rater=rater, step=1) }}">Back</a>
<a class="button" id="next" href="{{ url_for('instructions', rater=rater, step=3) }}">Next: when
you cannot choose</a></div>
{% endif %}
{% endblock %}
"""

_INSTRUCTIONS_3 = """{% extends "base.html" %}
{% block main %}
<div class="step">Introduction, step 3 of 3</div>
<h1>When you cannot choose</h1>
<p class="lead">Sometimes both crops resemble the visualization equally well, or neither does.</p>
<p>Then press <b>Decline (neither / both match)</b> instead of guessing. It is recorded as
declining to answer. Each task has these three buttons:</p>
<div class="buttons">
  <button type="button" disabled>Left</button>
  <button type="button" disabled>Right</button>
  <button type="button" class="decline" disabled>Decline (neither / both match)</button>
</div>
<p class="note">Each answer is final: there is no going back to a previous task. You can stop at
any time and come back later with the same rater id ({{ rater }}); you will continue at the first
task you have not answered. There are {{ total }} tasks.</p>
<div class="nav">
<a class="button secondary" href="{{ url_for('instructions', rater=rater, step=2) }}">Back</a>
<a class="button" id="begin" href="{{ url_for('task_page', rater=rater) }}">Start the
{{ total }} tasks</a></div>
{% endblock %}
"""

_TASK = """{% extends "base.html" %}{% from "four.html" import four %}
{% block main %}
<div class="progress"><span id="progress">Task {{ index }} of {{ total }}</span>
<progress max="{{ total }}" value="{{ index - 1 }}"></progress></div>
{% if resumed %}<p class="note" id="resumed">Welcome back: you continue at task {{ index }} of
{{ total }}.</p>{% endif %}
<div id="task" data-task-id="{{ task_id }}">
{{ four(src) }}
<p class="question">Which crop more closely resembles the neuron visualization?</p>
<div class="buttons">
  <button type="button" data-choice="left">Left</button>
  <button type="button" data-choice="right">Right</button>
  <button type="button" class="decline" data-choice="decline">Decline (neither / both
  match)</button>
</div>
<p class="error" id="error" role="alert"></p>
</div>
<script>
(function () {
  var rater = {{ rater|tojson }}, taskId = {{ task_id|tojson }};
  var next = {{ url_for('task_page', rater=rater)|tojson }};
  var buttons = document.querySelectorAll("button[data-choice]");
  function enable(on) { buttons.forEach(function (b) { b.disabled = !on; }); }
  buttons.forEach(function (b) {
    b.addEventListener("click", function () {
      enable(false);
      fetch({{ url_for('api_answer')|tojson }}, {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({rater: rater, task_id: taskId, choice: b.dataset.choice})
      }).then(function (r) {
        // read the whole reply before leaving the page (leaving aborts an unread reply)
        return r.json().then(function (body) {
          if (r.ok || r.status === 409) { window.location.replace(body.next || next); return; }
          document.getElementById("error").textContent = body.error || ("error " + r.status);
          enable(true);
        });
      }).catch(function (e) {
        document.getElementById("error").textContent = "The answer was not saved: " + e;
        enable(true);
      });
    });
  });
})();
</script>
{% endblock %}
"""

_DONE = """{% extends "base.html" %}
{% block main %}
<div class="progress"><span id="progress">{{ total }} of {{ total }} answered</span>
<progress max="{{ total }}" value="{{ total }}"></progress></div>
<h1 id="done">Thank you, {{ rater }}!</h1>
<p class="lead">You have answered all {{ total }} tasks ({{ declined }} declined). Your answers
are saved; you can close this page.</p>
{% endblock %}
"""

_ERROR = """{% extends "base.html" %}
{% block main %}
<h1>{{ code }}</h1>
<p class="error">{{ message }}</p>
<p><a href="/">Back to the start page</a></p>
{% endblock %}
"""

TEMPLATES = {
    "base.html": _BASE, "four.html": _FOUR, "start.html": _START,
    "instructions1.html": _INSTRUCTIONS_1, "instructions2.html": _INSTRUCTIONS_2,
    "instructions3.html": _INSTRUCTIONS_3, "task.html": _TASK, "done.html": _DONE,
    "error.html": _ERROR,
}

CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'")
