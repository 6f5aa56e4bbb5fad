// The playground's chat and text completion: POST /v1/chat/completions (or /v1/completions) with stream=true on the member's session (the session cookie;
// same-origin, so the CSRF check passes) and show each token as it arrives.
"use strict";
(() => {
  const form = document.getElementById("chat");
  if (!form) return;
  const reply = document.getElementById("reply");
  const usage = document.getElementById("reply-usage");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  let controller = null;

  stop.addEventListener("click", () => controller && controller.abort());

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const chat = data.get("mode") !== "completion";
    const body = { model: form.dataset.model };
    if (chat) {
      body.messages = [];
      if (data.get("system")) body.messages.push({ role: "system", content: data.get("system") });
      body.messages.push({ role: "user", content: data.get("prompt") });
    } else {
      body.prompt = data.get("prompt");
    }
    Object.assign(body, {
      max_tokens: Number(data.get("max_tokens") || 48),
      temperature: Number(data.get("temperature") || 0),
      stream: true,
      stream_options: { include_usage: true },
    });
    reply.textContent = "";
    usage.textContent = "";
    send.disabled = true;
    stop.disabled = false;
    controller = new AbortController();
    try {
      const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        credentials: "same-origin",
        signal: controller.signal,
      });
      if (!response.ok) {
        const problem = await response.json().catch(() => ({}));
        reply.textContent = (problem.error && problem.error.message) || `HTTP ${response.status}`;
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const payload = line.slice(6);
            if (payload === "[DONE]") continue;
            const chunk = JSON.parse(payload);
            if (chunk.error) { reply.textContent += `\n[${chunk.error.message}]`; continue; }
            const choice = chunk.choices && chunk.choices[0];
            const text = choice && (chat ? choice.delta && choice.delta.content : choice.text);
            if (text) reply.textContent += text;
            if (chunk.usage) {
              usage.textContent = `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} completion tokens`;
            }
          }
        }
      }
    } catch (error) {
      if (error.name !== "AbortError") reply.textContent += `\n[${error.message}]`;
    } finally {
      send.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });
})();
