package org.pocketllm.core

import java.io.File

/** The script that builds an ExecuTorch runtime (AAR) with pocketllm's kernels linked in. */
const val KERNEL_BUILD_SCRIPT = "android_demo/scripts/build_executorch_aar.sh"

/**
 * Why a bundle cannot be used, as the app shows it: a short title and one line that says what to do.
 * Thrown by BundleLoader, BundleVerifier and KernelCheck.
 */
sealed class BundleProblem(val title: String, message: String) : Exception(message) {
    override val message: String get() = super.message ?: title

    class NotABundle(val dir: File) : BundleProblem(
        "Not a bundle",
        "${dir.path} has no manifest.json (is it a bundle written by `pocketllm export`?)")

    class UnreadableManifest(val file: File, reason: String) : BundleProblem(
        "Unreadable manifest", "${file.path}: $reason")

    class UnknownSchemaVersion(val found: Any?) : BundleProblem(
        "Unsupported bundle version",
        "manifest.json: unknown schema_version ${shortValue(found)} (this app reads $SCHEMA_VERSION); " +
            "re-export the bundle with a matching pocketllm, or update the app")

    class InvalidManifest(val where: String, val problem: String) : BundleProblem(
        "Invalid manifest", "manifest.json: " + (if (where.length == 0) problem else "$where: $problem"))

    class MissingFile(val name: String) : BundleProblem(
        "Missing file", "$name is listed in manifest.json but missing; push the bundle again")

    class SizeMismatch(val name: String, val expected: Long, val actual: Long) : BundleProblem(
        "Bad file size",
        "$name: size $actual does not match manifest.json ($expected); the bundle is corrupt or incomplete, " +
            "push it again")

    class HashMismatch(val name: String, val expected: String, val actual: String) : BundleProblem(
        "Bad hash",
        "$name: sha256 ${actual.take(12)}... does not match manifest.json (${expected.take(12)}...); " +
            "the bundle is corrupt or was modified, push it again")

    class NoExecutorchTarget(val targets: List<String>) : BundleProblem(
        "No ExecuTorch program",
        "this bundle has no ExecuTorch target (it has: ${targets.joinToString(", ")}); " +
            "export it with `pocketllm export --target executorch`")

    class MissingKernels(val missing: List<String>, val runtime: String) : BundleProblem(
        "Missing kernels",
        "this bundle needs ${missing.joinToString(", ")}, which the app's ExecuTorch runtime ($runtime) lacks; " +
            "build a runtime with them using $KERNEL_BUILD_SCRIPT (it writes android_demo/app/libs/executorch.aar) " +
            "and rebuild the app")
}
