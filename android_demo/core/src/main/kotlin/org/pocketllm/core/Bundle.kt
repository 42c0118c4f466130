package org.pocketllm.core

import java.io.File

/** A bundle directory with its parsed manifest. Paths from the manifest are resolved inside `dir` only. */
class Bundle(val dir: File, val manifest: Manifest) {
    val name: String get() = manifest.name

    /** The file a manifest path names; refuses paths that resolve outside the bundle (symlinks included). */
    fun file(relative: String): File {
        val base = dir.canonicalFile
        val f = File(base, relative).canonicalFile
        if (!f.path.startsWith(base.path + File.separator)) {
            throw BundleProblem.InvalidManifest("files", "'$relative' resolves outside the bundle directory")
        }
        return f
    }

    fun requireExecutorch(): ExecutorchTarget =
        manifest.executorch ?: throw BundleProblem.NoExecutorchTarget(manifest.targetNames)

    /** What the ExecuTorch runtime reads: the program and the tokenizer files. They must all be present. */
    fun executorchFiles(): List<String> {
        val target = requireExecutorch()
        val names = ArrayList<String>()
        names.add(target.file)
        for (f in manifest.tokenizer.files) if (f !in names) names.add(f)
        return names
    }

    /** Every file listed in the manifest that the ExecuTorch runtime needs, plus any other listed file present
     * here (other targets' artifacts are optional on a phone: `pocketllm push android` copies only these). */
    fun filesToVerify(): List<String> {
        val names = ArrayList(executorchFiles())
        for (name in manifest.files.keys) if (name !in names && file(name).exists()) names.add(name)
        return names
    }

    val pteFile: File get() = file(requireExecutorch().file)
    val tokenizerFile: File get() = file(manifest.tokenizer.file)

    companion object {
        const val MANIFEST = "manifest.json"
        private const val MAX_MANIFEST_BYTES = 64L shl 20

        /** Read and validate `dir/manifest.json` (no hashing: BundleVerifier does that). */
        fun open(dir: File): Bundle {
            val f = File(dir, MANIFEST)
            if (!f.isFile) throw BundleProblem.NotABundle(dir)
            if (f.length() > MAX_MANIFEST_BYTES) {
                throw BundleProblem.UnreadableManifest(f, "${f.length()} bytes is too large for a manifest")
            }
            val text = try {
                f.readText(Charsets.UTF_8)
            } catch (e: java.io.IOException) {
                throw BundleProblem.UnreadableManifest(f, e.message ?: e.javaClass.simpleName)
            }
            return Bundle(dir, ManifestParser.parse(text))
        }
    }
}

/** One directory found while scanning: a usable bundle, or the problem that makes it unusable. */
class BundleEntry(val dir: File, val bundle: Bundle?, val problem: BundleProblem?) {
    val displayName: String get() = bundle?.name ?: dir.name
}

class ScanResult(val entries: List<BundleEntry>, val unreadableRoots: List<File>)

/** Bundles are the directories holding a manifest.json directly under each root (hidden ones skipped: push stages
 * into `.<name>.partial`). A root that exists but cannot be listed is reported, not fatal. */
object BundleDiscovery {
    fun scan(roots: List<File>): ScanResult {
        val entries = ArrayList<BundleEntry>()
        val unreadable = ArrayList<File>()
        for (root in roots) {
            if (!root.isDirectory) continue
            val children = root.listFiles()
            if (children == null) {
                unreadable.add(root)
                continue
            }
            val dirs = children.filter { it.isDirectory && !it.name.startsWith(".") && File(it, Bundle.MANIFEST).isFile }
            for (d in dirs.sortedBy { it.name }) {
                entries.add(try {
                    BundleEntry(d, Bundle.open(d), null)
                } catch (p: BundleProblem) {
                    BundleEntry(d, null, p)
                })
            }
        }
        return ScanResult(entries, unreadable)
    }
}
