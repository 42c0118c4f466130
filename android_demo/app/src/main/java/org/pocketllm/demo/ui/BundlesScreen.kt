package org.pocketllm.demo.ui

import androidx.compose.foundation.clickable
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.PaddingValues
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material.icons.Icons
import androidx.compose.material.icons.filled.Refresh
import androidx.compose.material3.Card
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.Icon
import androidx.compose.material3.IconButton
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Text
import androidx.compose.material3.TopAppBar
import androidx.compose.runtime.Composable
import androidx.compose.ui.Modifier
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.unit.dp
import org.pocketllm.core.BundleEntry
import org.pocketllm.core.RuntimeKernels
import org.pocketllm.demo.Screen

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun BundlesScreen(s: Screen.Bundles, runtime: RuntimeKernels, onOpen: (BundleEntry) -> Unit, onRefresh: () -> Unit) {
    Scaffold(
        topBar = {
            TopAppBar(
                title = { Text("pocketllm") },
                actions = { IconButton(onClick = onRefresh) { Icon(Icons.Filled.Refresh, contentDescription = "Rescan") } },
            )
        },
    ) { padding ->
        LazyColumn(
            modifier = Modifier.fillMaxSize().padding(padding),
            contentPadding = PaddingValues(16.dp),
            verticalArrangement = Arrangement.spacedBy(12.dp),
        ) {
            item {
                Text("Runtime: ${runtime.description}", style = MaterialTheme.typography.bodySmall)
                if (runtime.kernels.isNotEmpty()) {
                    Text("Kernels: ${runtime.kernels.joinToString(", ")}", style = MaterialTheme.typography.bodySmall)
                }
            }
            if (s.entries.isEmpty()) {
                item { NoBundles(s) }
            }
            items(s.entries, key = { it.dir.path }) { entry -> BundleCard(entry, runtime, onClick = { onOpen(entry) }) }
            if (s.unreadable.isNotEmpty()) {
                item {
                    Text("Cannot list ${s.unreadable.joinToString(", ") { it.path }} (permission denied): copy bundles " +
                        "into ${s.roots.first().path} instead.",
                        style = MaterialTheme.typography.bodySmall, color = MaterialTheme.colorScheme.error)
                }
            }
        }
    }
}

@Composable
private fun NoBundles(s: Screen.Bundles) {
    Column(modifier = Modifier.fillMaxWidth().padding(vertical = 24.dp)) {
        Text("No bundles found", style = MaterialTheme.typography.headlineSmall)
        Spacer(Modifier.height(8.dp))
        Text("Export a model and push it from your computer:", style = MaterialTheme.typography.bodyMedium)
        Spacer(Modifier.height(8.dp))
        Text("pocketllm export --checkpoint CKPT --target executorch --out out/NAME\npocketllm push android out/NAME",
            fontFamily = FontFamily.Monospace, style = MaterialTheme.typography.bodySmall)
        Spacer(Modifier.height(12.dp))
        Text("Searched: ${s.roots.joinToString(", ") { it.path }}", style = MaterialTheme.typography.bodySmall)
    }
}

@Composable
private fun BundleCard(entry: BundleEntry, runtime: RuntimeKernels, onClick: () -> Unit) {
    Card(modifier = Modifier.fillMaxWidth().clickable(onClick = onClick)) {
        Column(modifier = Modifier.padding(16.dp)) {
            Text(entry.displayName, style = MaterialTheme.typography.titleMedium)
            Text(entry.dir.path, style = MaterialTheme.typography.bodySmall)
            val bundle = entry.bundle
            val problem = entry.problem
            if (bundle != null) {
                val m = bundle.manifest
                val pte = m.executorch?.let { m.files[it.file]?.size }
                Spacer(Modifier.height(4.dp))
                Text("${m.architecture} · ${m.quantization.scheme} · ${m.model.numLayers} layers · " +
                    "context ${m.model.maxContext}" + (if (pte != null) " · ${mib(pte)}" else ""),
                    style = MaterialTheme.typography.bodyMedium)
                val needs = m.executorch?.requiresKernels ?: emptyList()
                if (needs.isNotEmpty()) {
                    val missing = needs.filter { it !in runtime.kernels }
                    Text(
                        if (missing.isEmpty()) "kernels: ${needs.joinToString(", ")} (available)"
                        else "needs kernels this runtime lacks: ${missing.joinToString(", ")}",
                        style = MaterialTheme.typography.bodySmall,
                        color = if (missing.isEmpty()) MaterialTheme.colorScheme.onSurfaceVariant
                        else MaterialTheme.colorScheme.error,
                    )
                }
                if (m.executorch == null) {
                    Text("no ExecuTorch program (targets: ${m.targetNames.joinToString(", ")})",
                        style = MaterialTheme.typography.bodySmall, color = MaterialTheme.colorScheme.error)
                }
            } else if (problem != null) {
                Spacer(Modifier.height(4.dp))
                Text("${problem.title}: ${problem.message}", style = MaterialTheme.typography.bodySmall,
                    color = MaterialTheme.colorScheme.error)
            }
        }
    }
}
