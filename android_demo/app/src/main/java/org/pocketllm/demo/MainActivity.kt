package org.pocketllm.demo

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.enableEdgeToEdge
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.material3.Surface
import androidx.compose.ui.Modifier
import org.pocketllm.demo.ui.PocketllmApp
import org.pocketllm.demo.ui.PocketllmTheme

class MainActivity : ComponentActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        enableEdgeToEdge()
        setContent {
            PocketllmTheme {
                Surface(modifier = Modifier.fillMaxSize()) {
                    PocketllmApp()
                }
            }
        }
    }
}
