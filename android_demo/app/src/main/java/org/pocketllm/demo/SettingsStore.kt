package org.pocketllm.demo

import android.content.Context
import org.pocketllm.core.GenerationSettings

/** Generation settings kept across launches (SharedPreferences). */
class SettingsStore(context: Context) {
    private val prefs = context.getSharedPreferences("generation", Context.MODE_PRIVATE)
    private val defaults = GenerationSettings()

    fun load(): GenerationSettings = GenerationSettings(
        temperature = prefs.getFloat(TEMPERATURE, defaults.temperature),
        topP = prefs.getFloat(TOP_P, defaults.topP),
        maxNewTokens = prefs.getInt(MAX_NEW_TOKENS, defaults.maxNewTokens),
        systemPrompt = prefs.getString(SYSTEM_PROMPT, defaults.systemPrompt) ?: "",
        useChatTemplate = prefs.getBoolean(USE_TEMPLATE, defaults.useChatTemplate),
    )

    fun save(s: GenerationSettings) {
        prefs.edit()
            .putFloat(TEMPERATURE, s.temperature)
            .putFloat(TOP_P, s.topP)
            .putInt(MAX_NEW_TOKENS, s.maxNewTokens)
            .putString(SYSTEM_PROMPT, s.systemPrompt)
            .putBoolean(USE_TEMPLATE, s.useChatTemplate)
            .apply()
    }

    private companion object {
        const val TEMPERATURE = "temperature"
        const val TOP_P = "top_p"
        const val MAX_NEW_TOKENS = "max_new_tokens"
        const val SYSTEM_PROMPT = "system_prompt"
        const val USE_TEMPLATE = "use_chat_template"
    }
}
