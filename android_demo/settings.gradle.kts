// pocketllm's Android demo: `app` (Compose UI, ExecuTorch LlmModule) on top of `core` (plain Kotlin/JVM: bundle
// discovery, manifest model and validation, sha256 verification, chat formatting, generation settings and stats).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "pocketllm-android"

include(":core")
include(":app")
