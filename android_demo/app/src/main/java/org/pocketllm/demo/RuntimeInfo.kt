package org.pocketllm.demo

import android.content.Context
import org.pocketllm.core.RuntimeKernels
import java.io.File
import java.io.FileNotFoundException

/** What this build of the app can run, and where it looks for bundles. */
object RuntimeInfo {
    /** The pocketllm kernels linked into the ExecuTorch runtime: listed in the custom AAR's
     * assets/pocketllm_kernels.json; none in the stock Maven AAR (no such asset). */
    fun kernels(context: Context): RuntimeKernels = try {
        val text = context.assets.open(RuntimeKernels.ASSET).bufferedReader().use { it.readText() }
        RuntimeKernels.parse(text)
    } catch (e: FileNotFoundException) {
        RuntimeKernels.stock(BuildConfig.EXECUTORCH_VERSION)
    } catch (e: IllegalArgumentException) {
        RuntimeKernels(emptySet(), "ExecuTorch from ${BuildConfig.EXECUTORCH_SOURCE} (unreadable kernel list: ${e.message})",
            BuildConfig.EXECUTORCH_VERSION)
    }

    /** Bundle roots, in display order: the app's external files dir (adb can write it on most devices:
     * /sdcard/Android/data/org.pocketllm.demo/files/bundles), its internal files dir, and the directory
     * `pocketllm push android` fills. */
    fun bundleRoots(context: Context): List<File> {
        val roots = ArrayList<File>()
        context.getExternalFilesDir(null)?.let { roots.add(File(it, "bundles")) }
        roots.add(File(context.filesDir, "bundles"))
        roots.add(File(PUSH_ROOT))
        return roots
    }

    const val PUSH_ROOT = "/data/local/tmp/pocketllm"
}
