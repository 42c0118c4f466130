package org.pocketllm.core

data class ChatMessage(val role: Role, val content: String)

/**
 * Prompt text from the manifest's chat strings, exactly as export/bundle/chat.py render_chat does:
 * prefix[role] + content + suffix[role] for each message, then the generation prefix. The exporter verified that
 * this reproduces the checkpoint's Jinja template byte for byte (leading BOS aside: the runtime adds it as a token).
 */
class ChatFormatter(val format: ChatFormat) {
    fun render(messages: List<ChatMessage>, addGenerationPrompt: Boolean = true): String {
        val sb = StringBuilder()
        for ((i, m) in messages.withIndex()) {
            val r = format.roles[m.role]
                ?: throw IllegalArgumentException("message $i: this model's chat format has no ${m.role.key} role")
            sb.append(r.prefix).append(m.content).append(r.suffix)
        }
        if (addGenerationPrompt) sb.append(format.generationPrefix)
        return sb.toString()
    }

    /** Texts that end an assistant turn when they appear in the output: the end-of-turn token at the start of the
     * assistant suffix (e.g. "<|im_end|>"), and the given texts of the stop tokens. */
    fun stopTexts(stopTokenTexts: List<String>): List<String> {
        val out = ArrayList<String>()
        for (t in stopTokenTexts) if (t.isNotEmpty() && t !in out) out.add(t)
        val suffix = format.roles[Role.ASSISTANT]?.suffix?.trim() ?: ""
        if (suffix.isNotEmpty() && out.none { suffix.startsWith(it) }) out.add(suffix)
        return out
    }
}

/**
 * Streams generated text while holding back what could be the start of a stop text, so "<|im_end|>" never flashes
 * on screen. After a stop text, `stopped` is true and later input is dropped.
 */
class StopTextFilter(private val stopTexts: List<String>) {
    private val pending = StringBuilder()
    var stopped: Boolean = false
        private set

    /** Feed one streamed piece; returns the text that is safe to show now. */
    fun push(piece: String): String {
        if (stopped) return ""
        pending.append(piece)
        var cut = -1
        for (s in stopTexts) {
            val i = pending.indexOf(s)
            if (i >= 0 && (cut < 0 || i < cut)) cut = i
        }
        if (cut >= 0) {
            stopped = true
            val out = pending.substring(0, cut)
            pending.setLength(0)
            return out
        }
        val text = pending.toString()
        var hold = 0  // longest tail of the text that is a proper prefix of some stop text
        for (s in stopTexts) {
            var k = Math.min(s.length - 1, text.length)
            while (k > hold) {
                if (text.regionMatches(text.length - k, s, 0, k)) {
                    hold = k
                    break
                }
                k--
            }
        }
        pending.delete(0, text.length - hold)
        return text.substring(0, text.length - hold)
    }

    /** End of stream: whatever was held back is text after all. */
    fun finish(): String {
        val out = pending.toString()
        pending.setLength(0)
        return out
    }
}

/** What to send for the next turn: `resetContext` clears the runtime's KV cache first. */
class TurnPlan(val prompt: String, val resetContext: Boolean, val messages: List<ChatMessage>)

/**
 * A conversation and what the runtime's context holds. ExecuTorch's LlmModule keeps its KV cache between
 * generate() calls, so a follow-up turn only needs the text after what was already fed — valid when the last reply
 * ended on its own at a stop text (the stop token itself is sampled, not fed). After a stop by the user or the token
 * limit, a template change or a new system prompt, the next turn resets the context and sends the whole
 * conversation again. With the template off (or no chat format), each message is a plain completion prompt.
 */
class ChatSession(private val chat: ChatFormat?) {
    private val formatter = chat?.let { ChatFormatter(it) }
    private val history = ArrayList<ChatMessage>()
    private var fed: String? = null  // exactly the text in the runtime's context; null = unknown, reset next turn
    private var fedSystemPrompt = ""

    val messages: List<ChatMessage> get() = history.toList()
    val canUseTemplate: Boolean get() = chat != null
    val supportsSystemPrompt: Boolean get() = chat?.supportsSystem == true

    fun plan(userText: String, systemPrompt: String, useTemplate: Boolean): TurnPlan {
        val user = ChatMessage(Role.USER, userText)
        if (formatter == null || !useTemplate) return TurnPlan(userText, true, listOf(user))
        val conversation = ArrayList<ChatMessage>()
        if (systemPrompt.isNotEmpty() && supportsSystemPrompt) conversation.add(ChatMessage(Role.SYSTEM, systemPrompt))
        conversation.addAll(history)
        conversation.add(user)
        val full = formatter.render(conversation)
        val known = fed
        return if (known != null && history.isNotEmpty() && fedSystemPrompt == systemPrompt && full.startsWith(known)) {
            TurnPlan(full.substring(known.length), false, conversation)
        } else {
            TurnPlan(full, true, conversation)
        }
    }

    /** Record the finished turn. reply: the text generated (stop text removed); endedAtStop: generation ended by
     * itself at a stop text, so the context holds the prompt and the reply exactly. */
    fun commit(plan: TurnPlan, userText: String, reply: String, endedAtStop: Boolean, systemPrompt: String,
               useTemplate: Boolean) {
        history.add(ChatMessage(Role.USER, userText))
        history.add(ChatMessage(Role.ASSISTANT, reply))
        if (formatter == null || !useTemplate || !endedAtStop) {
            fed = null
            return
        }
        fed = (if (plan.resetContext) "" else (fed ?: "")) + plan.prompt + reply
        fedSystemPrompt = systemPrompt
    }

    /** The runtime's context no longer matches (error, reload): the next turn starts over. */
    fun invalidateContext() {
        fed = null
    }

    fun clear() {
        history.clear()
        fed = null
    }
}
