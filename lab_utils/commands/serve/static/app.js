// genlab serve's page: every chosen family draws the same prompt with the same seed, side by side.
// Each family is one POST /generate-image/stream; its server-sent events (start, progress, done, error)
// are read from the response body and drawn as they come. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];

async function loadModels() {
  const response = await fetch("/models");
  const body = await response.json();
  models = body.models;
  const families = $("families");
  for (const model of models) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    Object.assign(box, { type: "checkbox", name: "model", value: model.name, checked: true });
    label.append(box, ` ${model.name} `);
    const detail = document.createElement("span");
    detail.className = "family";
    detail.textContent = `(${model.family}, ${(model.parameters / 1e6).toFixed(2)}M)`;
    label.append(detail);
    families.append(label);
  }
  $("n").max = body.limits.n;
  samplingControls(models);
  $("prompt").maxLength = body.limits.prompt_chars;
  const examples = models.length ? models[0].example_prompts.slice(0, 8) : [];
  for (const text of examples) {
    const chip = document.createElement("button");
    Object.assign(chip, { type: "button", textContent: text });
    chip.addEventListener("click", () => { $("prompt").value = text; });
    $("examples").append(chip);
  }
  if (examples.length && !$("prompt").value) $("prompt").value = examples[0];
}

// The sampling options of every served family, as GET /models describes them (each family's SampleOptions
// dataclass: type, bounds or choices, help, default): one control per name, empty = each model's default.
// A new option of a family appears here with no edit of the page.
function samplingControls(models) {
  const union = new Map();  // option name -> { spec, families }
  for (const model of models) {
    for (const [name, spec] of Object.entries(model.options)) {
      const seen = union.get(name) || { spec: { ...spec, choices: [] }, families: [] };
      seen.families.push(model.name);
      if (spec.type === "string") seen.spec.choices = [...new Set([...seen.spec.choices, ...spec.choices])];
      else {
        seen.spec.min = Math.min(seen.spec.min ?? spec.min, spec.min);
        seen.spec.max = Math.max(seen.spec.max ?? spec.max, spec.max);
      }
      union.set(name, seen);
    }
  }
  const box = $("sampling-options");
  for (const [name, { spec, families }] of union) {
    const label = document.createElement("label");
    label.title = `${spec.help || name} (${families.join(", ")}; each model keeps its default where this is empty)`;
    let control;
    if (spec.type === "string") {
      control = document.createElement("select");
      control.append(Object.assign(document.createElement("option"), { value: "", textContent: "default" }));
      for (const choice of spec.choices) control.append(Object.assign(document.createElement("option"), { textContent: choice }));
    } else {
      control = document.createElement("input");
      Object.assign(control, { type: "number", min: spec.min, max: spec.max, placeholder: "default",
                               step: spec.type === "integer" ? "1" : "any" });
    }
    control.id = `option-${name}`;
    control.dataset.option = name;
    label.append(`${name[0].toUpperCase()}${name.slice(1)} `, control);
    box.append(label);
  }
}

function request(model) {
  // The options this family takes (GET /models lists them); empty controls keep the model's defaults, and a
  // choice this family does not offer (ddim for the flow) is left out for it.
  const body = { prompt: $("prompt").value, model: model.name, n: Number($("n").value), seed: Number($("seed").value) };
  for (const control of document.querySelectorAll("#sampling-options [data-option]")) {
    const name = control.dataset.option, spec = model.options[name];
    if (!spec || control.value === "") continue;
    if (spec.type === "string") { if (spec.choices.includes(control.value)) body[name] = control.value; }
    else body[name] = Number(control.value);
  }
  return body;
}

// How each family turns noise into an image: one line under its name, so the columns read as a comparison.
const HOW = {
  dcgan: "a GAN: one pass of the generator",
  vae: "a VAE: a draw from the prior p(z | prompt), decoded",
  ddpm: "a DDPM: denoising steps on the 32x32 pixels",
  ldm: "latent diffusion: denoising steps on 4x8x8 latents, then the decoder",
  flow: "rectified flow: ODE steps along straight paths from noise to the 32x32 pixels",
};

function card(model) {
  const element = document.createElement("article");
  element.className = "card";
  element.dataset.model = model.name;
  element.innerHTML = `<h3></h3><div class="family"></div><div class="how"></div><div class="images"></div>
    <progress max="1" value="0"></progress><div class="status">waiting</div><div class="clip"></div>
    <div class="settings"></div>`;
  element.querySelector("h3").textContent = model.name;
  element.querySelector(".family").textContent =
    `${model.family} · ${model.dataset} · ${(model.parameters / 1e6).toFixed(2)}M parameters`;
  element.querySelector(".how").textContent = HOW[model.family] || "";
  return element;
}

function showImages(element, images) {
  // one <img> per image, two to a row: the same grid while denoising and when done
  const box = element.querySelector(".images");
  box.style.setProperty("--columns", Math.min(images.length, 2));
  while (box.children.length < images.length) box.append(Object.assign(document.createElement("img"), { alt: "" }));
  images.forEach((data, i) => { box.children[i].src = `data:image/png;base64,${data}`; });
}

// Each image's CLIP score against the prompt (the cosine of their embeddings in the lab's CLIP model of the
// dataset, GET /models' clip_scorer), under the images and as each image's tooltip, beside the dataset's real
// images' mean score with their own captions where the server knows it.
function showClipScores(model, element, scores) {
  const line = element.querySelector(".clip");
  if (!scores) { line.textContent = "no CLIP score (no CLIP model for this dataset)"; return; }
  const images = element.querySelectorAll(".images img");
  scores.forEach((score, i) => { if (images[i]) images[i].title = `CLIP score ${score.toFixed(3)}`; });
  const mean = scores.reduce((sum, score) => sum + score, 0) / scores.length;
  const real = model.clip_score_real == null ? "" : `; real images ${model.clip_score_real.toFixed(2)}`;
  line.textContent = `CLIP score vs the prompt: ${scores.map((score) => score.toFixed(2)).join(", ")} ` +
    `(mean ${mean.toFixed(2)}${real})`;
  line.title = `cosine of each image and the prompt in ${model.clip_scorer}, the lab's CLIP model of ` +
    `${model.dataset}: 1 is a perfect match, ~0 an unrelated prompt`;
  element.dataset.clipScores = scores.join(",");
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(event, JSON.parse(data)); // a block of comments only (": keep-alive") carries no event
    }
  }
}

async function draw(model, element) {
  const bar = element.querySelector("progress");
  const status = element.querySelector(".status");
  const started = performance.now();
  const response = await fetch("/generate-image/stream", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request(model)),
  });
  if (!response.ok) {
    const refused = await response.json().catch(() => ({ detail: response.statusText }));
    status.textContent = `${response.status}: ${refused.detail}`;
    status.classList.add("error");
    return;
  }
  await readEvents(response, (event, data) => {
    if (event === "start") {
      status.textContent = "drawing";
      const shown = Object.entries(data.options).map(([k, v]) => `${k}=${v}`).join(", ");
      element.querySelector(".settings").textContent = shown ? `${shown}, seed ${data.seed}` : `seed ${data.seed}`;
      if (data.unknown_words.length) status.textContent += ` (unknown words read as [UNK]: ${data.unknown_words.join(", ")})`;
      if (data.ignored_words.length) status.textContent += ` (prompt too long: ignored ${data.ignored_words.join(" ")})`;
    } else if (event === "progress") {
      showImages(element, data.images);
      bar.value = data.step / data.steps;
      element.dataset.progress = data.step;
      element.dataset.progressEvents = Number(element.dataset.progressEvents || 0) + 1;
      status.textContent = `denoising: step ${data.step} of ${data.steps}, x0 estimate`;
    } else if (event === "done") {
      showImages(element, data.images);
      bar.value = 1;
      const waited = (performance.now() - started) / 1000;
      status.textContent = `done in ${data.seconds.toFixed(2)} s (${waited.toFixed(1)} s with the queue)`;
      showClipScores(model, element, data.clip_scores);
      element.dataset.done = "true";
    } else if (event === "error") {
      status.textContent = `${data.status}: ${data.detail}`;
      status.classList.add("error");
    }
  });
}

async function generate(event) {
  event.preventDefault();
  $("message").textContent = "";
  const chosen = [...document.querySelectorAll("#families input:checked")]
    .map((box) => models.find((model) => model.name === box.value));
  if (!chosen.length) { $("message").textContent = "choose at least one family"; return; }
  if (!$("prompt").value.trim()) { $("message").textContent = "type a prompt, or pick an example"; return; }
  $("comparison").hidden = false;
  $("comparison-title").textContent = `"${$("prompt").value}", seed ${$("seed").value}`;
  const results = $("results");
  results.replaceChildren();
  const cards = chosen.map((model) => { const element = card(model); results.append(element); return element; });
  $("generate").disabled = true;
  try {
    // One family after another: each uses every core while it draws, and its timing stays its own.
    for (let i = 0; i < chosen.length; i++) {
      try { await draw(chosen[i], cards[i]); } catch (err) {
        const status = cards[i].querySelector(".status");
        status.textContent = `failed: ${err}`;
        status.classList.add("error");
      }
    }
  } finally {
    $("generate").disabled = false;
  }
}

$("controls").addEventListener("submit", generate);
$("new-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 100000); });
loadModels().catch((err) => { $("message").textContent = `could not load the models: ${err}`; });
