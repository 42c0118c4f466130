package org.pocketllm.core

import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest
import java.util.concurrent.CancellationException

/** Progress of a verification: the file being hashed and the bytes hashed so far over all files. */
class VerifyProgress(
    val file: String,
    val fileIndex: Int,
    val fileCount: Int,
    val bytesDone: Long,
    val bytesTotal: Long
) {
    val fraction: Float get() = if (bytesTotal <= 0) 1f else (bytesDone.toDouble() / bytesTotal).toFloat()
}

private val HEX = "0123456789abcdef".toCharArray()

fun toHex(bytes: ByteArray): String {
    val out = CharArray(bytes.size * 2)
    for ((i, b) in bytes.withIndex()) {
        val v = b.toInt() and 0xff
        out[2 * i] = HEX[v ushr 4]
        out[2 * i + 1] = HEX[v and 0x0f]
    }
    return String(out)
}

/**
 * Checks that files match the manifest: present, same size, same sha256. Sizes are checked for every file before
 * any hashing, so a truncated or missing file is reported at once. Hashing streams in `chunkBytes` blocks;
 * `progress` is called after each block, `isCancelled` polled before each (CancellationException when true).
 */
class BundleVerifier(private val chunkBytes: Int = 1 shl 20) {
    fun verify(
        bundle: Bundle,
        names: List<String> = bundle.filesToVerify(),
        progress: (VerifyProgress) -> Unit = {},
        isCancelled: () -> Boolean = { false }
    ) {
        val entries = names.map { name ->
            name to (bundle.manifest.files[name]
                ?: throw BundleProblem.InvalidManifest("files", "'$name' is not listed in files"))
        }
        var total = 0L
        for ((name, entry) in entries) {
            val f = bundle.file(name)
            if (!f.isFile) throw BundleProblem.MissingFile(name)
            if (f.length() != entry.size) throw BundleProblem.SizeMismatch(name, entry.size, f.length())
            total += entry.size
        }
        var done = 0L
        val buffer = ByteArray(chunkBytes)
        for ((index, pair) in entries.withIndex()) {
            val (name, entry) = pair
            val digest = MessageDigest.getInstance("SHA-256")
            progress(VerifyProgress(name, index, entries.size, done, total))
            FileInputStream(bundle.file(name)).use { input ->
                while (true) {
                    if (isCancelled()) throw CancellationException("verification of ${bundle.name} cancelled")
                    val n = input.read(buffer)
                    if (n < 0) break
                    digest.update(buffer, 0, n)
                    done += n
                    progress(VerifyProgress(name, index, entries.size, done, total))
                }
            }
            val actual = toHex(digest.digest())
            if (actual != entry.sha256) throw BundleProblem.HashMismatch(name, entry.sha256, actual)
        }
    }

    companion object {
        fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            val buffer = ByteArray(1 shl 16)
            FileInputStream(file).use { input ->
                while (true) {
                    val n = input.read(buffer)
                    if (n < 0) break
                    digest.update(buffer, 0, n)
                }
            }
            return toHex(digest.digest())
        }
    }
}
