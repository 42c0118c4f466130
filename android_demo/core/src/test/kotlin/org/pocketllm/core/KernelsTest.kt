package org.pocketllm.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class KernelsTest {
    @Test
    fun theStockRuntimeRefusesBundlesThatNeedPocketllmKernels() {
        val stock = RuntimeKernels.stock("1.5.1")
        for (case in Fixtures.bundles) {
            val b = Bundle.open(case.dir)
            assertEquals(case.name, case.requiresKernels, KernelCheck.missing(b, stock))
            if (case.requiresKernels.isEmpty()) {
                KernelCheck.require(b, stock)
                continue
            }
            try {
                KernelCheck.require(b, stock)
                fail("${case.name}: accepted by the stock runtime")
            } catch (p: BundleProblem.MissingKernels) {
                for (op in case.requiresKernels) assertTrue(p.message, p.message.contains(op))
                assertTrue(p.message, p.message.contains(KERNEL_BUILD_SCRIPT))
                assertTrue(p.message, p.message.contains("stock ExecuTorch 1.5.1"))
            }
        }
    }

    @Test
    fun theBuildScriptsKernelListIsReadAndSatisfiesTheBundles() {
        val json = Fixtures.kernelsJson ?: return  // host kernel library not built in this run
        val runtime = RuntimeKernels.parse(json.readText())
        assertEquals(Fixtures.hostKernels.toSet(), runtime.kernels)
        for (case in Fixtures.bundles) KernelCheck.require(Bundle.open(case.dir), runtime)
    }

    @Test
    fun aMalformedKernelListIsRefused() {
        for (text in listOf("[]", "{\"format\": 2, \"kernels\": []}", "{\"format\": 1, \"kernels\": [\"any4\"]}",
            "{\"format\": 1}")) {
            try {
                RuntimeKernels.parse(text)
                fail("accepted $text")
            } catch (e: IllegalArgumentException) {
                assertTrue(e.message, e.message!!.startsWith(RuntimeKernels.ASSET))
            }
        }
    }
}
