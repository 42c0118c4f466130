package org.pocketllm.demo.ui

import androidx.activity.compose.BackHandler
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.CircularProgressIndicator
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.Surface
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import androidx.lifecycle.viewmodel.compose.viewModel
import org.pocketllm.demo.ChatViewModel
import org.pocketllm.demo.Screen

/** One screen at a time, chosen by the view model's state machine. */
@Composable
fun PocketllmApp(vm: ChatViewModel = viewModel()) {
    val screen by vm.screen.collectAsStateWithLifecycle()
    when (val s = screen) {
        is Screen.Scanning -> Centered { Busy("Looking for bundles…") }
        is Screen.Bundles -> BundlesScreen(s, vm.runtime, onOpen = vm::open, onRefresh = vm::scan)
        is Screen.Verifying -> {
            BackHandler(onBack = vm::cancelOpen)
            VerifyScreen(s, onCancel = vm::cancelOpen)
        }
        is Screen.MemoryWarning -> {
            BackHandler(onBack = vm::cancelOpen)
            MemoryWarningScreen(s, onLoad = vm::loadAnyway, onBack = vm::cancelOpen)
        }
        is Screen.Loading -> Centered { Busy("Loading ${s.bundleName}…\nmapping the program and reading the tokenizer") }
        is Screen.Chat -> ChatScreen(vm)
        is Screen.Problem -> {
            BackHandler(onBack = vm::scan)
            ProblemScreen(s, onBack = vm::scan, onRetry = vm::retry)
        }
    }
}

@Composable
fun Centered(content: @Composable () -> Unit) {
    Column(
        modifier = Modifier.fillMaxSize().padding(32.dp),
        verticalArrangement = Arrangement.Center,
        horizontalAlignment = Alignment.CenterHorizontally,
    ) { content() }
}

@Composable
private fun Busy(text: String) {
    CircularProgressIndicator()
    Spacer(Modifier.height(16.dp))
    Text(text, style = MaterialTheme.typography.bodyLarge)
}

@Composable
fun VerifyScreen(s: Screen.Verifying, onCancel: () -> Unit) {
    Centered {
        Text("Checking ${s.bundleName}", style = MaterialTheme.typography.headlineSmall)
        Spacer(Modifier.height(8.dp))
        Text("sha256 of every file against manifest.json", style = MaterialTheme.typography.bodyMedium)
        Spacer(Modifier.height(24.dp))
        val p = s.progress
        if (p == null) {
            LinearProgressIndicator(modifier = Modifier.fillMaxWidth())
        } else {
            LinearProgressIndicator(progress = { p.fraction }, modifier = Modifier.fillMaxWidth())
            Spacer(Modifier.height(8.dp))
            Text("${p.file} (${p.fileIndex + 1}/${p.fileCount})", style = MaterialTheme.typography.bodyMedium)
            Text("${mib(p.bytesDone)} of ${mib(p.bytesTotal)}", style = MaterialTheme.typography.bodySmall)
        }
        Spacer(Modifier.height(24.dp))
        OutlinedButton(onClick = onCancel) { Text("Cancel") }
    }
}

@Composable
fun MemoryWarningScreen(s: Screen.MemoryWarning, onLoad: () -> Unit, onBack: () -> Unit) {
    Centered {
        Text("Not enough free memory", style = MaterialTheme.typography.headlineSmall,
            color = MaterialTheme.colorScheme.error)
        Spacer(Modifier.height(12.dp))
        Text("${s.bundleName} needs about ${gib(s.needBytes)} (program + KV cache); the device has " +
            "${gib(s.availableBytes)} free of ${gib(s.totalBytes)}. Loading may fail or Android may stop the app. " +
            "Close other apps, or use a smaller or more quantized bundle.",
            style = MaterialTheme.typography.bodyMedium)
        Spacer(Modifier.height(24.dp))
        Row(horizontalArrangement = Arrangement.spacedBy(12.dp)) {
            OutlinedButton(onClick = onBack) { Text("Back") }
            Button(onClick = onLoad) { Text("Load anyway") }
        }
    }
}

@Composable
fun ProblemScreen(s: Screen.Problem, onBack: () -> Unit, onRetry: () -> Unit) {
    Column(
        modifier = Modifier.fillMaxSize().padding(24.dp).verticalScroll(rememberScrollState()),
        verticalArrangement = Arrangement.Center,
    ) {
        Spacer(Modifier.height(48.dp))
        Text(s.title, style = MaterialTheme.typography.headlineSmall, color = MaterialTheme.colorScheme.error)
        Spacer(Modifier.height(12.dp))
        Text(s.message, style = MaterialTheme.typography.bodyLarge)
        val detail = s.detail
        if (detail != null) {
            Spacer(Modifier.height(16.dp))
            Surface(color = MaterialTheme.colorScheme.surfaceVariant, shape = MaterialTheme.shapes.small) {
                Text(detail, modifier = Modifier.padding(12.dp), fontFamily = FontFamily.Monospace,
                    style = MaterialTheme.typography.bodySmall)
            }
        }
        Spacer(Modifier.height(24.dp))
        Row(horizontalArrangement = Arrangement.spacedBy(12.dp)) {
            OutlinedButton(onClick = onBack) { Text("Bundles") }
            if (s.canRetry) Button(onClick = onRetry) { Text("Retry") }
        }
    }
}
