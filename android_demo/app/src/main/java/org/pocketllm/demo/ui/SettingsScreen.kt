package org.pocketllm.demo.ui

import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material.icons.Icons
import androidx.compose.material.icons.automirrored.filled.ArrowBack
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.HorizontalDivider
import androidx.compose.material3.Icon
import androidx.compose.material3.IconButton
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Slider
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.material3.TopAppBar
import androidx.compose.runtime.Composable
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import org.pocketllm.core.GenerationSettings
import org.pocketllm.demo.BuildConfig
import org.pocketllm.demo.ChatUi
import java.util.Locale
import kotlin.math.roundToInt

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun SettingsScreen(settings: GenerationSettings, chat: ChatUi, onChange: (GenerationSettings) -> Unit, onClose: () -> Unit) {
    Scaffold(
        topBar = {
            TopAppBar(
                title = { Text("Settings") },
                navigationIcon = {
                    IconButton(onClick = onClose) { Icon(Icons.AutoMirrored.Filled.ArrowBack, contentDescription = "Back") }
                },
            )
        },
    ) { padding ->
        Column(modifier = Modifier.fillMaxSize().padding(padding).padding(16.dp).verticalScroll(rememberScrollState())) {
            Label("Temperature ${fmt(settings.temperature)}", "0 = greedy; ExecuTorch's sampler takes 0 to 1.")
            Slider(value = settings.temperature, onValueChange = { onChange(settings.copy(temperature = it)) },
                valueRange = 0f..1f)

            Label("Top-p ${fmt(settings.topP)}",
                if (chat.topPSupported) "Sample from the smallest set of tokens whose probability reaches p."
                else "This runtime (ExecuTorch LlmModule) samples with a fixed top-p of 0.9.")
            Slider(value = settings.topP, onValueChange = { onChange(settings.copy(topP = it)) },
                valueRange = 0.05f..1f, enabled = chat.topPSupported)

            val maxTokens = (chat.maxContext - 1).coerceAtLeast(2)
            Label("Max new tokens ${settings.maxNewTokens.coerceAtMost(maxTokens)}",
                "Per reply; the conversation itself must fit the model's context of ${chat.maxContext} tokens.")
            Slider(
                value = settings.maxNewTokens.coerceIn(1, maxTokens).toFloat(),
                onValueChange = { onChange(settings.copy(maxNewTokens = it.roundToInt().coerceIn(1, maxTokens))) },
                valueRange = 1f..maxTokens.toFloat(),
            )

            HorizontalDivider(modifier = Modifier.padding(vertical = 12.dp))
            Row(verticalAlignment = Alignment.CenterVertically, modifier = Modifier.fillMaxWidth()) {
                Column(modifier = Modifier.weight(1f)) {
                    Label("Chat template",
                        when {
                            !chat.templateAvailable -> "This bundle has no chat format: each message is continued as plain text."
                            settings.useChatTemplate -> "Messages are formatted with the model's own template (from its manifest)."
                            else -> "Off: each message is sent as plain text for the model to continue, without history."
                        })
                }
                Switch(checked = settings.useChatTemplate && chat.templateAvailable,
                    onCheckedChange = { onChange(settings.copy(useChatTemplate = it)) },
                    enabled = chat.templateAvailable)
            }
            Spacer(Modifier.height(12.dp))
            val systemEnabled = chat.systemPromptSupported && chat.templateAvailable && settings.useChatTemplate
            OutlinedTextField(
                value = settings.systemPrompt,
                onValueChange = { onChange(settings.copy(systemPrompt = it)) },
                label = { Text("System prompt") },
                enabled = systemEnabled,
                minLines = 3,
                modifier = Modifier.fillMaxWidth(),
            )
            if (!chat.systemPromptSupported && chat.templateAvailable) {
                Text("This model's chat template has no system turn.", style = MaterialTheme.typography.bodySmall)
            } else {
                Text("A new system prompt starts the conversation's context over.", style = MaterialTheme.typography.bodySmall)
            }

            HorizontalDivider(modifier = Modifier.padding(vertical = 12.dp))
            Text("Runtime: ExecuTorch ${BuildConfig.EXECUTORCH_VERSION} from ${BuildConfig.EXECUTORCH_SOURCE}",
                style = MaterialTheme.typography.bodySmall)
            if (chat.loadMs > 0) {
                Text("Model loaded in ${chat.loadMs} ms (after its sha256 check).", style = MaterialTheme.typography.bodySmall)
            }
        }
    }
}

@Composable
private fun Label(title: String, help: String) {
    Text(title, style = MaterialTheme.typography.titleSmall)
    Text(help, style = MaterialTheme.typography.bodySmall)
}

private fun fmt(v: Float): String = String.format(Locale.ROOT, "%.2f", v)
